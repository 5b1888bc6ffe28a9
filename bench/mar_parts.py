"""MAR-B sampling, piece by piece, jaxgen next to the official code: where a sampling call's time goes.

  python bench/mar_parts.py --official_src=/tmp/official/src --official_python=/tmp/official/venv/bin/python

Two pieces, each timed alternately for both sides in one invocation (random weights, f32, best of --reps):
- head: the DiffLoss MLP (6 x 1024, CFG form `forward_with_cfg`) over the 100 DDPM steps of one AR step, at R rows
  (R = 2 x batch x tokens revealed per image: 16 at 64 AR steps with batch 2, 4 at 256). jaxgen runs its whole
  `diffloss_sample` (one lax.scan incl. p_sample); the official side its net alone, 100 calls, so its figure is a floor.
- decoder: one MAE decoder pass over 4 sequences of buffer + 256 tokens (batch 2 with CFG), half the tokens masked.
A 64-step MAR-B sample is ~64 decoder passes + 6,400 head steps + the encoder on the visible tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHOR_DIR = os.path.join(os.path.dirname(REPO), "shared", "anchor_bench")

OFFICIAL = r"""
import json, sys, time, torch
from functools import partial
src, anchor, rows_list, reps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
sys.path.insert(0, anchor); sys.path.insert(0, src + "/mar")
import bench_official; bench_official.preload_torchvision()
from models.diffloss import SimpleMLPAdaLN
from models.mar import MAR
out = {}
with torch.no_grad():
    net = SimpleMLPAdaLN(16, 1024, 32, 768, 6).eval()
    for p in net.parameters(): torch.nn.init.normal_(p, std=0.02)
    for rows in rows_list:
        x, c, t = torch.randn(rows, 16), torch.randn(rows, 768), torch.full((rows,), 500)
        for _ in range(10): net.forward_with_cfg(x, t, c, 3.0)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(100): net.forward_with_cfg(x, t, c, 3.0)
            best = min(best, time.perf_counter() - t0)
        out[f"head_{rows}"] = best / 100
    m = MAR(img_size=256, vae_stride=16, patch_size=1, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
            decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), vae_embed_dim=16, buffer_size=64, diffloss_d=6,
            diffloss_w=1024, num_sampling_steps="100").eval()
    mask = torch.zeros(4, 256)
    for b in range(4): mask[b, torch.randperm(256)[:128]] = 1
    x = torch.randn(4, 64 + 128, 768)  # the official decoder takes buffer + visible rows
    m.forward_mae_decoder(x, mask)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter(); m.forward_mae_decoder(x, mask); best = min(best, time.perf_counter() - t0)
    out["decoder"] = best
print(json.dumps(out))
"""


def jaxgen_parts(rows_list, reps):
    sys.path.insert(0, REPO)
    from jaxgen.utils.host_memory import keep_freed_memory
    keep_freed_memory()
    import flax
    import jax
    import jax.numpy as jnp

    from jaxgen.diffusion.diffloss import diffloss_sample
    from jaxgen.diffusion.gaussian import create_diffusion
    from jaxgen.families.mar.model import MAR, embedded_denoiser, head_step_params, init_params
    from jaxgen.nn import kernel_layout
    from timing import best_of

    model = MAR(encoder_embed_dim=768, decoder_embed_dim=768, encoder_depth=12, decoder_depth=12,
                encoder_num_heads=12, decoder_num_heads=12, diffloss_d=6, diffloss_w=1024)
    params = flax.core.meta.unbox(init_params(model, jax.random.PRNGKey(0)))
    leaves, tree = jax.tree.flatten(params)  # N(0, 0.02) everywhere, as the anchor does for zero-initialised layers
    params = jax.tree.unflatten(tree, [0.02 * jax.random.normal(jax.random.PRNGKey(i), a.shape)
                                       for i, a in enumerate(leaves)])
    diffusion = create_diffusion("100", "cosine")

    def head(p, z, rng):  # as the sampler runs it: condition and timesteps embedded once per call
        step_params = head_step_params(p) if kernel_layout.wanted(z.shape[0]) else None  # as the sampler picks
        net = embedded_denoiser(model, {"params": p}, guided=True, step_params=step_params)
        return diffloss_sample(net, z, rng, diffusion, cfg=jnp.float32(3.0), guided=True, channels=16)

    out = {}
    head_fn = jax.jit(head)
    for rows in rows_list:
        z = jax.random.normal(jax.random.PRNGKey(1), (rows, 768))
        out[f"head_{rows}"] = best_of(head_fn, (params, z, jax.random.PRNGKey(2)), reps) / 100
    mask = (jax.random.uniform(jax.random.PRNGKey(3), (4, 256)) < 0.5).astype(jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(4), (4, 320, 768))
    decoder = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, False, method=MAR.forward_mae_decoder))
    out["decoder"] = best_of(decoder, (params, x, mask), reps)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official_src", default="", help="the anchor's extracted sources (…/src); empty: jaxgen only")
    ap.add_argument("--official_python", default="", help="the anchor venv's python")
    ap.add_argument("--rows", default="4,16,64", help="head rows to time (comma list)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    result = {"jaxgen": jaxgen_parts(rows_list, args.reps)}
    if args.official_src:
        env = dict(os.environ)
        from jaxgen.utils.host_memory import SETTINGS
        env.update(SETTINGS)  # the same allocator settings as jaxgen's process (see vs_official.py)
        proc = subprocess.run([args.official_python, "-c", OFFICIAL, args.official_src, ANCHOR_DIR,
                               json.dumps(rows_list), str(args.reps)], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"official side failed:\n{proc.stderr[-3000:]}")
        result["official"] = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in result["jaxgen"]:
        ours = result["jaxgen"][key]
        unit, scale = ("ms per DDPM step", 1e3) if key.startswith("head") else ("s per pass", 1.0)
        line = f"{key:10s} jaxgen {ours * scale:8.2f} {unit}"
        if "official" in result:
            theirs = result["official"][key]
            line += f" | official {theirs * scale:8.2f} | official / jaxgen {theirs / ours:.2f}x"
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
