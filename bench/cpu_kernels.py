"""jaxgen's CPU decode kernels (jaxgen/kernels/cpu.cc) against XLA's own ops, on the shapes of a decode step.

  python bench/cpu_kernels.py --rows=1,4,8 [--json=out.json]

- matmul: a chain of RAR-B-sized f32 layers (24 x [768x2304, 768x768, 768x3072, 3072x768], as one decode step reads
  them) at R rows, `--steps` steps in one jitted loop; GB/s of weights read, XLA's dot against the kernel.
- decode attention: one query per (batch, head) over a KV cache of RAR-B's size (4 x 16 heads x 258 slots x 48), for
  cache lengths 1 .. 258 in a loop (a whole sample's worth); XLA's masked full-cache attention against the kernel.
- out-major matmul: MAR-B's diffusion-head step kernels (12 x 1024 x 1024, stored (out, in) as the sampler keeps
  them) at --wt_rows rows; XLA's dot on the (in, out) views against `matmul_wt`.
- group norm: GroupNorm + SiLU at a 256 px VQVAE decoder's shapes (batch 2); XLA's ops against the kernel.
Same process, same allocator settings as jaxgen.main; best of --reps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import best_of  # noqa: E402


def matmul_chain(rows, steps, reps):
    import jax
    import jax.numpy as jnp

    from jaxgen.kernels import cpu

    d, depth = 768, 24
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    keys = iter(jax.random.split(jax.random.PRNGKey(0), depth * len(shapes)))
    weights = [tuple(0.02 * jax.random.normal(next(keys), s) for s in shapes) for _ in range(depth)]
    nbytes = sum(w.size * 4 for layer in weights for w in layer)

    def make(mm):
        def layer(x, w):
            a, b, c, e = w
            h = mm(x, a)
            x = x + mm(h[:, :d] + 0.1 * h[:, d:2 * d], b)
            return x + mm(jax.nn.gelu(mm(x, c), approximate=False), e)

        @jax.jit
        def run(x, ws):
            def body(_, x):
                for w in ws:
                    x = jnp.tanh(layer(x, w))
                return x
            return jax.lax.fori_loop(0, steps, body, x)
        return run

    x = jnp.full((rows, d), 0.01, jnp.float32)
    out = {}
    for name, mm in (("xla", jnp.dot), ("kernel", cpu.matmul)):
        seconds = best_of(make(mm), (x, weights), reps)
        out[name] = {"seconds": seconds, "gb_per_s": steps * nbytes / seconds / 1e9}
    return out


def decode_attention(reps):
    import jax
    import jax.numpy as jnp

    from jaxgen.kernels import cpu
    from jaxgen.nn.attention import dot_product_attention

    b, n, s, h = 4, 16, 258, 48
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (b, 1, n, h))
    k, v = (jax.random.normal(kk, (b, n, s, h)) for kk in keys[1:])

    def xla(q, k, v, length):
        return dot_product_attention(q, k, v, mask=(jnp.arange(s) < length)[None, None, None], kv_layout="BNSH")

    def kernel(q, k, v, length):
        return cpu.decode_attention(q, k, v, length, h ** -0.5)

    def sweep(attend):
        @jax.jit
        def run(q, k, v):
            return jax.lax.fori_loop(1, s + 1, lambda i, q: q + 1e-3 * attend(q, k, v, i), q)
        return run

    out = {}
    for name, attend in (("xla", xla), ("kernel", kernel)):
        seconds = best_of(sweep(attend), (q, k, v), reps)
        out[name] = {"seconds": seconds, "ms_per_step": 1e3 * seconds / s}
    return out


def out_major_matmul(rows, reps):
    import jax
    import jax.numpy as jnp

    from jaxgen.kernels import cpu

    keys = jax.random.split(jax.random.PRNGKey(2), 12)
    stored = [0.03 * jax.random.normal(k, (1024, 1024)) for k in keys]  # (out, in)

    def chain(mm):
        @jax.jit
        def run(x, ws):
            for w in ws:
                x = jnp.tanh(mm(x, w))
            return x
        return run

    x = jnp.full((rows, 1024), 0.01, jnp.float32)
    nbytes = sum(w.size * 4 for w in stored)
    out = {}
    for name, mm in (("xla", lambda x, w: jnp.dot(x, w.T)), ("kernel", cpu.matmul_wt)):
        seconds = best_of(chain(mm), (x, stored), reps)
        out[name] = {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9}
    return out


def group_norm(reps):
    import jax
    import jax.numpy as jnp

    from jaxgen.kernels import cpu
    from jaxgen.nn.conv import _group_norm_reference

    out = {}
    for shape in ((2, 256, 256, 160), (2, 128, 128, 320), (2, 64, 64, 320)):
        x = jax.random.normal(jax.random.PRNGKey(3), shape)
        scale, bias = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
        times = {}
        for name, fn in (("xla", lambda x, s, b: _group_norm_reference(x, s, b, 32, 1e-6, True)),
                         ("kernel", lambda x, s, b: cpu.group_norm(x, s, b, 32, 1e-6, silu=True))):
            times[name] = {"seconds": best_of(jax.jit(fn), (x, scale, bias), reps)}
        out["x".join(map(str, shape))] = times
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--wt_rows", default="12,16,24")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    from jaxgen.utils.host_memory import keep_freed_memory

    keep_freed_memory()
    from jaxgen.kernels import cpu

    if not cpu.available():
        raise SystemExit(f"the CPU kernels are not available here: {cpu._state.get('why')}")
    result = {"matmul": {}, "decode_attention": decode_attention(args.reps), "out_major_matmul": {},
              "group_norm": group_norm(args.reps)}
    for rows in (int(r) for r in args.rows.split(",")):
        result["matmul"][rows] = r = matmul_chain(rows, args.steps, args.reps)
        print(f"matmul {rows:2d} rows: XLA {r['xla']['gb_per_s']:5.1f} GB/s | "
              f"kernel {r['kernel']['gb_per_s']:5.1f} GB/s")
    for rows in (int(r) for r in args.wt_rows.split(",")):
        result["out_major_matmul"][rows] = r = out_major_matmul(rows, args.reps)
        print(f"out-major matmul {rows:2d} rows (12 x 1024 x 1024): XLA {r['xla']['gb_per_s']:5.1f} GB/s | "
              f"kernel {r['kernel']['gb_per_s']:5.1f} GB/s")
    for shape, r in result["group_norm"].items():
        print(f"group norm + SiLU {shape}: XLA {1e3 * r['xla']['seconds']:.2f} ms | "
              f"kernel {1e3 * r['kernel']['seconds']:.2f} ms")
    a = result["decode_attention"]
    print(f"decode attention (4 x 16 x 258 x 48, every length): XLA {a['xla']['ms_per_step']:.3f} ms/step | "
          f"kernel {a['kernel']['ms_per_step']:.3f} ms/step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
