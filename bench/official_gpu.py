"""The OFFICIAL PyTorch code on an accelerator, at any batch and dtype: the GPU side of bench/vs_official.py.

../shared/anchor_bench/bench_official.py times the official code on the CPU in float32 at fixed batches. On a GPU the
comparison the speed issue asks for is bf16 at batch 32 / 256, which that driver cannot do (it keeps MAR's `.cuda()`
calls on the CPU and builds VAR on 'cpu'). This file builds the same official models through the anchor's own
builders (official constructors, official init, the anchor's treatment of zero-initialised layers), moves them to
the device and runs the same official calls under `torch.autocast(dtype)`, the way the official training and
evaluation scripts run them (MAR / VAR: autocast; no loss scaler is needed in bf16). Nothing of the official code is
here. One row per process, so the device's peak memory is per measurement:

  python bench/official_gpu.py --src /tmp/official/src --row var_d16_sample --batch 256 --dtype bfloat16 --out r.json

Times: `torch.cuda.synchronize()` around each call, --warmup untimed calls first (cuDNN / cuBLAS autotuning, lazy
module loading), median of --reps. Peak memory: `torch.cuda.max_memory_allocated()` (what PyTorch's allocator
handed out; jaxgen reports XLA's peak_bytes_in_use, the same notion) and the process's peak RSS.
--device=cpu runs the same code on the CPU (with the anchor's `.cuda()` no-op), which is how this file is tested.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official_rows import load_anchor  # noqa: E402

ANCHOR = load_anchor()
ROWS = {}


def row(name):
    def deco(fn):
        ROWS[name] = fn
        return fn
    return deco


class Ctx:
    """What every row needs: the anchor's args (its --src), the device, the autocast context and a timer."""

    def __init__(self, args):
        import torch

        self.args = argparse.Namespace(src=args.src)
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.batch, self.reps, self.warmup = args.batch, args.reps, args.warmup
        if self.device.type != "cpu":
            # the official code calls .cuda() on the tensors it creates: on a GPU that is where they belong
            ANCHOR.cuda_noop = contextlib.nullcontext

    def autocast(self):
        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn):
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return times

    def train_step(self, model, opt, loss_fn):
        import torch

        def step():
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                loss = loss_fn()
            loss.backward()
            opt.step()
            return loss
        torch.manual_seed(0)
        return step

    def labels(self, n):
        import torch

        return (torch.arange(n) * 97 % 1000).to(self.device)

    def inputs(self, *specs):
        """Random training inputs on the device, drawn on the CPU from one seeded generator (as the anchor draws
        them): an int spec is randint(high, shape), None is randn(shape)."""
        import torch

        g = torch.Generator().manual_seed(1)
        return [(torch.randn(shape, generator=g) if high is None else torch.randint(0, high, shape, generator=g))
                .to(self.device) for high, shape in specs]


def _mar(ctx, size):
    model, stack, info = ANCHOR.build_mar(ctx.args, size)
    return model.to(ctx.device), stack


def _mar_sample(ctx, num_iter):
    import torch

    model, stack = _mar(ctx, "b")
    with stack, torch.no_grad():
        model.eval()
        labels = ctx.labels(ctx.batch)

        def run():
            with ctx.autocast():
                model.sample_tokens(bsz=ctx.batch, num_iter=num_iter, cfg=3.0, cfg_schedule="linear", labels=labels,
                                    temperature=1.0)
        return ctx.time(run)


for _n in (64, 256):
    row(f"mar_b_sample_iter{_n}")(lambda ctx, n=_n: _mar_sample(ctx, n))


def _mar_train(ctx, size):
    import torch

    model, stack = _mar(ctx, size)
    with stack:
        model.train()
        x, labels = ctx.inputs((None, (ctx.batch, 16, 16, 16)), (1000, (ctx.batch,)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
        return ctx.time(ctx.train_step(model, opt, lambda: model(x, labels)))


row("mar_b_train")(lambda ctx: _mar_train(ctx, "b"))
row("mar_l_train")(lambda ctx: _mar_train(ctx, "l"))


def _var(ctx):
    vae, var, stack, info = ANCHOR.build_var(ctx.args, 16)
    return vae.to(ctx.device), var.to(ctx.device), stack


@row("var_d16_sample")
def _var_sample(ctx):
    vae, var, stack = _var(ctx)
    with stack:
        var.eval()
        labels = ctx.labels(ctx.batch)

        def run():
            with ctx.autocast():  # the official demo samples under autocast; decoding included (fhat_to_img)
                var.autoregressive_infer_cfg(B=ctx.batch, label_B=labels, g_seed=0, cfg=1.5, top_k=900, top_p=0.96,
                                             more_smooth=False)
        return ctx.time(run)


@row("var_d16_train")
def _var_train(ctx):
    import torch
    import torch.nn.functional as F

    vae, var, stack = _var(ctx)
    with stack:
        var.train()
        L, first_l, V = var.L, var.first_l, var.V
        label_B, x_in, gt = ctx.inputs((1000, (ctx.batch,)), (None, (ctx.batch, L - first_l, var.Cvae)),
                                       (V, (ctx.batch, L)))
        opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

        def loss_fn():
            return F.cross_entropy(var(label_B, x_in).view(-1, V).float(), gt.view(-1))
        return ctx.time(ctx.train_step(var, opt, loss_fn))


def _rar(ctx):
    model, conf, stack, info = ANCHOR.build_rar(ctx.args)
    return model.to(ctx.device), conf, stack


@row("rar_b_sample")
def _rar_sample(ctx):
    import torch

    model, conf, stack = _rar(ctx)
    with stack, torch.no_grad():
        model.eval()
        labels = ctx.labels(ctx.batch)

        def run():
            with ctx.autocast():
                model.generate(condition=labels.clone(), guidance_scale=16.0, randomize_temperature=1.0,
                               guidance_scale_pow=2.75, kv_cache=True)
        return ctx.time(run)


@row("rar_b_train")
def _rar_train(ctx):
    import torch

    model, conf, stack = _rar(ctx)
    with stack:
        from modeling.modules.losses import ARLoss

        model.train()
        model.set_random_ratio(1.0)
        ids, labels = ctx.inputs((ANCHOR.RAR_B["codebook_size"], (ctx.batch, ANCHOR.RAR_B["image_seq_len"])),
                                 (1000, (ctx.batch,)))
        loss_mod = ARLoss(conf)
        opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.96), weight_decay=0.03)

        def loss_fn():
            cond = model.preprocess_condition(labels.clone(), cond_drop_prob=0.1)
            logits, lab = model(ids, cond, return_labels=True)
            return loss_mod(logits.float(), lab)[0]
        return ctx.time(ctx.train_step(model, opt, loss_fn))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="folder with mar/, VAR/, 1d-tokenizer/ (anchor_bench's setup.sh)")
    ap.add_argument("--row", required=True, choices=sorted(ROWS))
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device=cuda but torch sees no GPU; use --device=cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # as the official training scripts set it
    torch.backends.cudnn.allow_tf32 = True
    ctx = Ctx(args)
    times = ROWS[args.row](ctx)
    peak_dev = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    result = {"row": args.row, "batch": args.batch, "dtype": args.dtype, "times_s": times,
              "median_s": statistics.median(times), "peak_device_mb": peak_dev,
              "peak_rss_mb": ANCHOR.peak_rss_mb(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "commits": {s: ANCHOR.commit_of(args.src, s) for s in ("mar", "VAR", "1d-tokenizer")}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
