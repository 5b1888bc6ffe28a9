"""Training and sampling throughput of any jaxgen config on synthetic inputs (random weights, no data needed).

  python bench/throughput.py --config=configs/mar_b.py --what=train --config.batch_size=8 --steps=5
  python bench/throughput.py --config=configs/mar_b.py --what=sample --config.sample.num_iter=64 --batch=8
  python bench/throughput.py --config=configs/var_d16.py --what=sample --batch=8 --json=out.json

Train: the real jitted, donated train step (sharded over all local devices) on random batches of the family's
batch shapes; reports the median step time, steps/s, images/s, GFLOP/s and MFU against --peak_tflops (per device)
on the model FLOPs of bench/flops.py (MAR, VAR, RAR; XLA's count of the step, kept as `xla_flops`, elsewhere). Sample: `family.sample` (or `sample_tokens`) jitted once, then
timed per call; median and images/s. Compile time is reported apart and never counted; peak RSS of the process
too, and on an accelerator XLA's peak device memory (set XLA_PYTHON_CLIENT_PREALLOCATE=false to make it meaningful).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_enum("what", "train", ["train", "sample", "sample_tokens"],
                  "What to time: a train step, family.sample (decoded images), or family.sample_tokens (the "
                  "generator's tokens / latents only, for families that have it: MAR, RAR).")
flags.DEFINE_integer("steps", 5, "Timed train steps (after one warm-up step).")
flags.DEFINE_integer("batch", 0, "Sampling batch (default config.sample.batch_size).")
flags.DEFINE_integer("repeats", 2, "Timed sampling calls.")
flags.DEFINE_integer("warmup", 1, "Untimed sampling calls first (the sampler is compiled ahead of time either way).")
flags.DEFINE_float("peak_tflops", 0.0, "Peak dense bf16 TFLOP/s of one device, for MFU (H100 SXM: 989).")
flags.DEFINE_string("json", "", "Also write the result here.")
flags.DEFINE_string("profile_dir", "", "Trace one extra sampling call / train step with jax.profiler into this "
                    "directory (a Perfetto trace too; bench/op_profile.py sums it per XLA op).")


def _machine() -> str:
    import jax

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return f"{jax.device_count()} x {kind} ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)"


def _random_batch(family, batch_size, seed=0):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    num_classes = int(family.config.data.get("num_classes", 10))
    out = {}
    for k, s in family.dummy_batch(batch_size).items():
        if jnp.issubdtype(s.dtype, jnp.integer):
            out[k] = rng.integers(0, num_classes, s.shape).astype(s.dtype)
        else:
            out[k] = np.clip(rng.standard_normal(s.shape), -1, 1).astype(s.dtype)
    return out


def _random_frozen(config):
    """Random tokenizer params for families that decode through one (sampling only needs the shapes right)."""
    import jax
    from jaxgen import families
    from jaxgen.parallel import sharding as sh

    tok = families.build_tokenizer(config)
    if tok is None:
        return {}
    return {"tokenizer": sh.unbox(jax.jit(tok.init)(jax.random.PRNGKey(1)))}


def bench_train(config):
    import jax
    from jaxgen.parallel import sharding as sh
    from jaxgen.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, frozen=_random_frozen(config))
        trainer.state  # noqa: B018 - the state (created and ready), then the step, as Trainer.run does
        t0 = time.time()
        compiled = trainer.compiled_step()
        compile_s = time.time() - t0
        rss_compiled = _peak_rss_mb()
        with trainer.mesh_context():
            batch = sh.global_batch(_random_batch(trainer.family, config.batch_size), trainer.mesh, trainer.rules)
            flops = _flops_of(compiled)
            state, m = compiled(trainer.state, batch, trainer.frozen)
            jax.block_until_ready(m)
            times = []
            for _ in range(FLAGS.steps):
                t0 = time.time()
                state, m = compiled(state, batch, trainer.frozen)
                jax.block_until_ready(m)
                times.append(time.time() - t0)
            dt = statistics.median(times)
            if FLAGS.profile_dir:
                with jax.profiler.trace(FLAGS.profile_dir, create_perfetto_trace=True):
                    state, m = compiled(state, batch, trainer.frozen)
                    jax.block_until_ready(m)
        trainer.close()
    result = {"what": "train", "family": config.family, "batch_size": config.batch_size,
              "compute_dtype": config.compute_dtype, "compile_s": round(compile_s, 1), "times_s": times,
              "step_s": dt, "median_s": dt, "steps_per_s": 1.0 / dt, "images_per_s": config.batch_size / dt,
              "peak_rss_after_compile_mb": rss_compiled}
    from flops import train_flops

    counted = train_flops(trainer.family, config.batch_size)
    result["xla_flops"] = flops
    _add_flops(result, counted or flops, dt, "bench/flops.py" if counted else "xla")
    return result


def _flops_of(compiled):
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None


def _add_flops(result, flops, seconds, source="xla"):
    """cost_analysis counts the whole (SPMD-partitioned) program of one device. XLA counts a loop body ONCE, so for
    samplers built on a lax loop bench/flops.py counts the work instead (`flops_source` says which)."""
    if not flops:
        return
    result["flops"] = flops
    result["flops_source"] = source
    result["gflops_per_s"] = flops / seconds / 1e9
    result["tflops_per_device"] = flops / seconds / 1e12
    if FLAGS.peak_tflops:
        result["mfu"] = result["tflops_per_device"] / FLAGS.peak_tflops


def bench_sample(config):
    import jax
    import numpy as np
    from jaxgen import families
    from jaxgen.parallel import mesh as mesh_lib
    from jaxgen.parallel import sharding as sh
    from jaxgen import pipeline
    from jaxgen.train import restore
    from jaxgen.train.restore import replicate
    from jaxgen.utils.host_memory import map_large_blocks, release_free_memory

    family = families.build(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = sh.rules_tuple(config.mesh.rules)
    batch = FLAGS.batch or int(config.sample.batch_size)
    import flax.linen as nn

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        labels = jax.device_put(np.arange(batch, dtype=np.int32) % int(config.data.num_classes),
                                sh.batch_sharding(mesh, rules, 1))
        if FLAGS.what == "sample_tokens":
            if not hasattr(family, "sample_tokens"):
                raise SystemExit(f"family {family.name} has no sample_tokens; use --what=sample")
            fn = jax.jit(lambda p, f, l, r: family.sample_tokens(p, l, r))
        else:
            fn = jax.jit(family.sample)
        # compiled from the params' shapes before any weights exist, as jaxgen's sample / eval modes do
        # (`Sampler.precompile`)
        abstract = restore.abstract_params(family, mesh, config.mesh.rules)
        # tokens / latents only need no tokenizer (the official rows build none either)
        abstract_frozen = pipeline.abstract_frozen(family, mesh) if FLAGS.what == "sample" else {}
        t0 = time.time()
        compiled = fn.lower(abstract, abstract_frozen, labels, jax.random.PRNGKey(0)).compile()
        compile_s = time.time() - t0
        rss_compiled = _peak_rss_mb()
        release_free_memory()  # as `Sampler.precompile` does, and:
        map_large_blocks()
        params, _ = sh.sharded_init(lambda: family.init(jax.random.PRNGKey(0)), mesh, rules)
        frozen = replicate(_random_frozen(config), mesh) if FLAGS.what == "sample" else {}
        jax.block_until_ready((params, frozen))
        release_free_memory()  # as `pipeline.load_for_sampling` does after loading
        for w in range(FLAGS.warmup):
            jax.block_until_ready(compiled(params, frozen, labels, jax.random.PRNGKey(0)))
            if w == 0:
                release_free_memory()  # as `Sampler.generate` does after its first batch
        times = []
        for i in range(FLAGS.repeats):
            t0 = time.time()
            jax.block_until_ready(compiled(params, frozen, labels, jax.random.PRNGKey(i + 1)))
            times.append(time.time() - t0)
        dt = statistics.median(times)
        if FLAGS.profile_dir:
            with jax.profiler.trace(FLAGS.profile_dir, create_perfetto_trace=True):
                jax.block_until_ready(compiled(params, frozen, labels, jax.random.PRNGKey(0)))
    from jaxgen.families.base import GENERIC_SAMPLE_KEYS

    s = config.sample
    result = {"what": FLAGS.what, "family": config.family, "batch": batch, "compute_dtype": config.compute_dtype,
              "settings": {k: s[k] for k in sorted(s.keys()) if k not in GENERIC_SAMPLE_KEYS},
              "compile_s": round(compile_s, 1), "times_s": times, "call_s": dt, "median_s": dt,
              "images_per_s": batch / dt, "peak_rss_after_compile_mb": rss_compiled}
    from flops import sample_flops

    counted = sample_flops(family, FLAGS.what, batch)
    _add_flops(result, counted or _flops_of(compiled), dt, "bench/flops.py" if counted else "xla")
    return result


def _peak_rss_mb():
    """The process's peak RSS so far (compilation's included: XLA's compiler can be what sets it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _peak_device_mb():
    """Peak bytes XLA's allocator handed out on device 0 (accelerators; the CPU client keeps no such count)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**20 if peak else None


def main(argv):
    del argv
    from jaxgen.utils.host_memory import keep_freed_memory

    keep_freed_memory()  # as jaxgen.main does: XLA:CPU's per-step temporaries stay resident
    config = FLAGS.config
    result = bench_train(config) if FLAGS.what == "train" else bench_sample(config)
    result["machine"] = _machine()
    result["peak_rss_mb"] = _peak_rss_mb()
    result["peak_device_mb"] = _peak_device_mb()
    text = json.dumps(result, indent=1, sort_keys=True, default=str)
    print(text)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    from jaxgen.utils.host_memory import restart_with_huge_pages

    restart_with_huge_pages()  # as jaxgen.main does
    app.run(main)
