"""jaxgen.utils.xla_cpu: importing jaxgen gives XLA:CPU the memory-ordered scheduler (a random init of N bytes
of many leaves needs temporaries of a few leaves, not of all); the opt-out and a user's own XLA_FLAGS are respected."""
import os
import subprocess
import sys
import textwrap

_PROBE = textwrap.dedent("""
    import os, jaxgen, jax
    init = lambda k: [jax.random.normal(jax.random.fold_in(k, i), (256, 1024)) for i in range(32)]  # 32 x 1 MB
    lowered = jax.jit(init).lower(jax.random.PRNGKey(0))
    print(lowered.compile().memory_analysis().temp_size_in_bytes >> 20, os.environ.get("XLA_FLAGS", ""))
""")


def _run(**env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXGEN_XLA_CPU_SCHEDULER")}
    env.update(env_extra, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    temp_mb, *flags = out.stdout.split()
    return int(temp_mb), flags


def test_import_sets_the_memory_ordered_scheduler():
    temp_mb, flags = _run()
    assert flags == ["--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    assert temp_mb < 8  # one leaf's random bits at a time


def test_opt_out_and_user_flags_are_left_alone():
    temp_mb, flags = _run(JAXGEN_XLA_CPU_SCHEDULER="default")
    assert flags == [] and temp_mb >= 32  # the concurrency-optimised schedule keeps every leaf's random bits
    _, flags = _run(XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=true --xla_dump_to=/dev/null")
    assert flags == ["--xla_cpu_enable_concurrency_optimized_scheduler=true", "--xla_dump_to=/dev/null"]
