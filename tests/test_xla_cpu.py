"""jaxgen.utils.xla_cpu: importing jaxgen gives XLA:CPU the memory-ordered scheduler (a random init of N bytes
of many leaves needs temporaries of a few leaves, not of all) and, on Intel CPUs, Eigen's convolutions (the same
numbers as YNNPACK's); the opt-outs and a user's own XLA_FLAGS are respected."""
import os
import subprocess
import sys
import textwrap

from jaxgen.utils.xla_cpu import intel_cpu

_PROBE = textwrap.dedent("""
    import os, jaxgen, jax
    init = lambda k: [jax.random.normal(jax.random.fold_in(k, i), (256, 1024)) for i in range(32)]  # 32 x 1 MB
    lowered = jax.jit(init).lower(jax.random.PRNGKey(0))
    print(lowered.compile().memory_analysis().temp_size_in_bytes >> 20, os.environ.get("XLA_FLAGS", ""))
""")


def _run(**env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAXGEN_XLA_CPU_SCHEDULER", "JAXGEN_XLA_CPU_CONV")}
    env.update(env_extra, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    temp_mb, *flags = out.stdout.split()
    return int(temp_mb), flags


CONV = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_import_sets_the_memory_ordered_scheduler():
    temp_mb, flags = _run()
    assert flags == ["--xla_cpu_enable_concurrency_optimized_scheduler=false"] + ([CONV] if intel_cpu() else [])
    assert temp_mb < 8  # one leaf's random bits at a time


def test_opt_out_and_user_flags_are_left_alone():
    temp_mb, flags = _run(JAXGEN_XLA_CPU_SCHEDULER="default", JAXGEN_XLA_CPU_CONV="default")
    assert flags == [] and temp_mb >= 32  # the concurrency-optimised schedule keeps every leaf's random bits
    mine = "--xla_cpu_enable_concurrency_optimized_scheduler=true --xla_cpu_experimental_ynn_fusion_type=dot"
    _, flags = _run(XLA_FLAGS=mine)
    assert flags == mine.split()


_CONV_PROBE = textwrap.dedent("""
    import jaxgen, jax, numpy as np
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 32, 32))
    w = jax.random.normal(jax.random.PRNGKey(1), (8, 3, 3, 3)) * 0.2
    y = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME"))(x, w)
    np.save(__import__("sys").argv[1], np.asarray(y))
""")


def test_eigen_convolutions_compute_the_same_numbers(tmp_path):
    outs = []
    for name, extra in (("eigen", {"XLA_FLAGS": CONV}), ("ynn", {"JAXGEN_XLA_CPU_CONV": "default"})):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXGEN_XLA_CPU_CONV")}
        env.update(extra, JAX_PLATFORMS="cpu")
        path = tmp_path / f"{name}.npy"
        subprocess.run([sys.executable, "-c", _CONV_PROBE, str(path)], env=env, check=True)
        outs.append(__import__("numpy").load(path))
    assert outs[0].shape == (2, 8, 32, 32) and float(abs(outs[0]).mean()) > 0.1
    assert abs(outs[0] - outs[1]).max() < 1e-5
