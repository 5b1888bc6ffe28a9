"""jaxgen and the OFFICIAL PyTorch code side by side, alternately, in ONE invocation on one machine.

  python bench/vs_official.py --official_src=/tmp/official/src --official_python=/tmp/official/venv/bin/python \
      --rounds=2 --reps=2 --out=bench/results/vs_official_cpu.json          # every row (~1.5 h on 2 cores)

The official side is ../shared/anchor_bench/bench_official.py (set up as its README says: `fetch` the three repos,
then its setup.sh), driven through bench/official_rows.py, which adds MAR-B sampling at the papers' 64 and 256 AR
steps; each measurement runs in a child process that makes --warmup untimed calls and times --reps calls. The jaxgen
side is bench/throughput.py in a child process with the same work (float32, same batch, same settings). Rows
alternate official / jaxgen for --rounds rounds; per side the median over all timed calls is reported, with the ratio
official / jaxgen (> 1: jaxgen is faster), the peak RSS of each child, jaxgen's compile time (apart; jaxgen compiles
ahead of time, so a warm-up is not needed to keep compilation out of the timed calls) and GFLOP/s of both sides on
one FLOP count: bench/flops.py's count of the official work for the loop-built samplers (MAR, RAR), XLA's count of
the compiled program where it has no loops (VAR sampling, train steps). Rows whose official call takes minutes
cap rounds / reps / warmup (LONG below), which the table records.

Both children run with the same environment. By default that includes the glibc malloc settings jaxgen applies to
itself at start-up (jaxgen/utils/host_memory.py: one arena, no mmap for large blocks, no trimming), so the official
code gets them too: otherwise both re-fault their multi-GB per-step temporaries every step, which on VMs whose
balloon driver reports free pages to the host (this one) costs ~2 us/KB. Being exactly jaxgen's settings, they are
no opt-out for jaxgen's child: its sampling rows still map their large blocks (`map_large_blocks`).
--malloc=default gives both glibc's defaults (jaxgen's child then gets JAXGEN_HOST_MALLOC=system). Not shared:
glibc's huge-page tunable, with which jaxgen's child restarts itself (`restart_with_huge_pages`, as jaxgen.main
does): given to the official code it made it slower (MAR-B train step 8.0 -> 12.2 s in the same night;
docs/benchmarks.md).

On a GPU (both sides on the same device; the official side through bench/official_gpu.py, which builds the same
official models with the anchor's builders and runs them under torch.autocast):

  python bench/vs_official.py --device=gpu --dtype=bfloat16 --batch=32,256 --peak_tflops=989 --rounds=1 \
      --official_src=SRC --official_python=python3 --out=vs_official_gpu.json

adds the device's peak memory (PyTorch's max_memory_allocated, XLA's peak_bytes_in_use; XLA's preallocation is off in
both children) and, for train steps, MFU of both sides on XLA's FLOP count of the step. bench/gpu_vs_official.sh
runs exactly that on a leased machine. --deadline_s stops starting rows once a lease's time is nearly spent; a failed
row is recorded and the rest still run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_ROWS = os.path.join(REPO, "bench", "official_rows.py")
OFFICIAL_GPU = os.path.join(REPO, "bench", "official_gpu.py")

# official measurement -> (what, the jaxgen throughput.py flags doing the same work, the anchor's batch); official
# settings, see the anchor README. The batch and dtype flags are added per run (--batch, --dtype).
ROWS = {
    "rar_b_sample": ("sample", ["--config=configs/rar_b.py", "--what=sample_tokens"], 2),
    # the anchor's RAR step: AdamW without gradient clipping (the recipe clips at 1.0; here the same work as official)
    "rar_b_train": ("train", ["--config=configs/rar_b.py", "--what=train", "--config.optim.grad_clip=0"], 4),
    # the anchor's MAR and VAR steps: AdamW, no clipping, no EMA (the recipes clip and MAR keeps an EMA)
    "mar_b_train": ("train", ["--config=configs/mar_b.py:cached", "--what=train", "--config.optim.grad_clip=0",
                              "--config.optim.ema_decay=0"], 4),
    "mar_l_train": ("train", ["--config=configs/mar_l.py:cached", "--what=train", "--config.optim.grad_clip=0",
                              "--config.optim.ema_decay=0"], 4),
    "mar_b_sample_iter8": ("sample", ["--config=configs/mar_b.py", "--what=sample_tokens",
                                      "--config.sample.num_iter=8", "--config.sample.cfg=3.0"], 2),
    "mar_b_sample_iter16": ("sample", ["--config=configs/mar_b.py", "--what=sample_tokens",
                                       "--config.sample.num_iter=16", "--config.sample.cfg=3.0"], 2),
    # the papers' step counts (anchor: cfg 3.0 linear, 100 DDPM steps, latents only)
    "mar_b_sample_iter64": ("sample", ["--config=configs/mar_b.py", "--what=sample_tokens",
                                       "--config.sample.num_iter=64", "--config.sample.cfg=3.0"], 2),
    "mar_b_sample_iter256": ("sample", ["--config=configs/mar_b.py", "--what=sample_tokens",
                                        "--config.sample.num_iter=256", "--config.sample.cfg=3.0"], 2),
    "var_d16_sample": ("sample", ["--config=configs/var_d16.py", "--what=sample"], 2),
    # the anchor's VAR step starts from x_BLCv (no VQVAE encode): jaxgen trains on cached multi-scale codes the same way
    "var_d16_train": ("train", ["--config=configs/var_d16.py", "--what=train", "--config.optim.grad_clip=0",
                                "--config.data.cache=True"], 2),
}

DEFAULT_ROWS = ("mar_b_sample_iter64", "mar_b_sample_iter256", "var_d16_sample", "rar_b_sample", "mar_b_train",
                "var_d16_train", "rar_b_train")
# on an accelerator the issue's rows: sampling at the papers' settings, training MFU of MAR-L, VAR-d16 and RAR-B
DEFAULT_GPU_ROWS = ("var_d16_sample", "rar_b_sample", "mar_b_sample_iter64", "var_d16_train", "rar_b_train",
                    "mar_l_train", "mar_b_sample_iter256")
# (rounds, reps, warmup) caps for rows whose official call takes minutes on a 2-core CPU (~4.5 and ~14 min)
LONG = {"mar_b_sample_iter64": (1, 1, 0), "mar_b_sample_iter256": (1, 1, 0)}

sys.path.insert(0, REPO)
from jaxgen.utils.host_memory import SETTINGS as KEEP_FREED_MEMORY  # noqa: E402


def _child_env(args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if args.malloc == "keep":
        env.update(KEEP_FREED_MEMORY)
    else:
        env["JAXGEN_HOST_MALLOC"] = "system"
    if args.device != "cpu":
        # XLA otherwise takes 75 % of the GPU up front; grown on demand, its peak is comparable to PyTorch's
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def _plan(args, row):
    rounds, reps, warmup = LONG.get(row, (args.rounds, args.reps, args.warmup)) if args.device == "cpu" else (
        args.rounds, args.reps, args.warmup)
    return min(rounds, args.rounds), min(reps, args.reps), min(warmup, args.warmup)


def _uses_anchor(args, batch):
    """The anchor drives the documented CPU rows (float32, its batches); anything else goes through official_gpu.py."""
    return args.device == "cpu" and args.dtype == "float32" and batch is None


def _official(args, row, batch, reps, warmup):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        if _uses_anchor(args, batch):
            cmd = [args.official_python, OFFICIAL_ROWS, "--src", args.official_src, "--only", row, "--reps",
                   str(reps), "--warmup", str(warmup), "--threads", str(args.threads), "--out", out]
        else:
            cmd = [args.official_python, OFFICIAL_GPU, "--src", args.official_src, "--row", row, "--batch",
                   str(batch or ROWS[row][2]), "--dtype", args.dtype, "--device",
                   "cuda" if args.device == "gpu" else "cpu", "--reps", str(reps), "--warmup", str(warmup),
                   "--out", out]
        proc = _run(cmd, args, env=_child_env(args))
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"official {row} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        result = json.load(open(out))
    if not _uses_anchor(args, batch):
        return {"times_s": result["times_s"], "peak_rss_mb": result["peak_rss_mb"],
                "peak_device_mb": result["peak_device_mb"], "host": {"torch": result["torch"],
                                                                     "device": result["device"]},
                "commits": result["commits"]}
    if result.get("failures"):
        raise RuntimeError(f"official {row} failed: {result['failures'][0]['log_tail'][-2000:]}")
    meas = next(m for m in result["results"] if m["name"] == row)
    r = next(x for x in meas["rows"] if x["name"] == row)
    return {"times_s": r["times_s"], "peak_rss_mb": meas["peak_rss_mb"], "peak_device_mb": None,
            "host": result["host"], "commits": result["official_commits"]}


def _run(cmd, args=None, **kw):
    """A child process; past --row_timeout_s it is killed and the row fails (RuntimeError) instead of the run."""
    timeout = getattr(args, "row_timeout_s", 0) or None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{os.path.basename(cmd[1])} killed after {timeout:.0f} s (--row_timeout_s)") from e


def run_throughput(name, flags, env=None, args=None):
    """bench/throughput.py with `flags` in a child process -> its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        proc = _run([sys.executable, os.path.join(REPO, "bench", "throughput.py"), *flags, f"--json={out}"], args,
                    cwd=REPO, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"jaxgen {name} failed:\n{proc.stderr[-3000:]}")
        return json.load(open(out))


def parse_rows(text, known):
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in known]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(known)}")
    return rows


def jaxgen_flags(row, batch, dtype):
    what, flags, anchor_batch = ROWS[row]
    b = batch or anchor_batch
    # the tokenizer that decodes (VAR's VQVAE) computes in the row's dtype too: its run config says bfloat16
    # (a training choice), the official decode runs in the model's dtype
    decodes = "--what=sample" in flags
    return flags + [f"--batch={b}" if what == "sample" else f"--config.batch_size={b}",
                    f"--config.compute_dtype={dtype}"] + (
        [f"--config.tokenizer.config.compute_dtype={dtype}"] if decodes else [])


def _jaxgen(args, row, batch, reps, warmup):
    flags = jaxgen_flags(row, batch, args.dtype) + [f"--steps={reps}", f"--repeats={reps}", f"--warmup={warmup}"]
    if args.peak_tflops:
        flags.append(f"--peak_tflops={args.peak_tflops}")
    return run_throughput(row, flags, _child_env(args), args)


def measure(args, row, batch):
    """Alternate official / jaxgen for the planned rounds -> one table entry."""
    official, ours = [], []
    rounds, reps, warmup = _plan(args, row)
    for _ in range(rounds):  # jaxgen first: where it cannot run the row, no official time is spent on it
        ours.append(_jaxgen(args, row, batch, reps, warmup))
        official.append(_official(args, row, batch, reps, warmup))
    o_times = [t for r in official for t in r["times_s"]]
    j_times = [t for r in ours for t in r["times_s"]]
    o_med, j_med = statistics.median(o_times), statistics.median(j_times)
    flops = ours[-1].get("flops")
    peak = lambda rs, k: max((r.get(k) or 0) for r in rs) or None  # noqa: E731
    entry = {"row": row, "batch": batch or ROWS[row][2], "dtype": args.dtype,
             "official_median_s": o_med, "jaxgen_median_s": j_med, "ratio": o_med / j_med,
             "official_times_s": o_times, "jaxgen_times_s": j_times,
             "official_peak_rss_mb": peak(official, "peak_rss_mb"), "jaxgen_peak_rss_mb": peak(ours, "peak_rss_mb"),
             "jaxgen_peak_rss_after_compile_mb": peak(ours, "peak_rss_after_compile_mb"),
             "official_peak_device_mb": peak(official, "peak_device_mb"),
             "jaxgen_peak_device_mb": peak(ours, "peak_device_mb"),
             "jaxgen_compile_s": ours[-1]["compile_s"], "jaxgen_flags": jaxgen_flags(row, batch, args.dtype),
             "rounds": rounds, "reps": reps, "warmup": warmup, "flops_source": ours[-1].get("flops_source"),
             "counted_gflop": flops / 1e9 if flops else None,
             "jaxgen_gflops_per_s": flops / j_med / 1e9 if flops else None,
             "official_gflops_per_s": flops / o_med / 1e9 if flops else None,
             "official_host": official[-1]["host"], "official_commits": official[-1]["commits"]}
    if flops and args.peak_tflops:
        entry["jaxgen_mfu"] = flops / j_med / 1e12 / args.peak_tflops
        entry["official_mfu"] = flops / o_med / 1e12 / args.peak_tflops
    return entry


def describe(e):
    mem = "RSS" if not e["official_peak_device_mb"] else "device"
    o_mem = e["official_peak_rss_mb"] if mem == "RSS" else e["official_peak_device_mb"]
    j_mem = e["jaxgen_peak_rss_mb"] if mem == "RSS" else e["jaxgen_peak_device_mb"]
    text = (f"{e['row']:22s} b{e['batch']:<4d} [{e['rounds']}x{e['reps']}, warmup {e['warmup']}] "
            f"official {e['official_median_s']:8.3f} s  jaxgen {e['jaxgen_median_s']:8.3f} s  ratio {e['ratio']:5.2f}x  "
            f"{mem} {o_mem or 0:.0f} / {j_mem or 0:.0f} MB  compile {e['jaxgen_compile_s']} s")
    if e["counted_gflop"]:
        text += f"  GFLOP/s {e['official_gflops_per_s']:.1f} / {e['jaxgen_gflops_per_s']:.1f}"
    if "jaxgen_mfu" in e:
        text += f"  MFU {100 * e['official_mfu']:.1f} / {100 * e['jaxgen_mfu']:.1f} %"
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official_src", required=True, help="/tmp/official/src of the anchor_bench set-up")
    ap.add_argument("--official_python", required=True, help="its venv's python (on a GPU machine: the one with torch)")
    ap.add_argument("--rows", default="", help=f"comma list of {', '.join(ROWS)} (default: per --device)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="jaxgen's compute dtype (f32 params) and the official side's autocast dtype")
    ap.add_argument("--batch", default="", help="comma list of batch sizes (default: the anchor's, 2 / 4)")
    ap.add_argument("--train_batch", type=int, default=0,
                    help="batch of the train rows instead of --batch (per-device batches of the papers' runs: 48-64)")
    ap.add_argument("--rounds", type=int, default=2, help="official / jaxgen alternations per row")
    ap.add_argument("--reps", type=int, default=2, help="timed calls per side per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per side per round (train: 1 step)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (XLA uses every core)")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="'keep': both children keep freed memory (see above); 'default': glibc's defaults")
    ap.add_argument("--peak_tflops", type=float, default=0.0,
                    help="peak dense TFLOP/s of one device, for MFU of both sides (H100 / H200 SXM bf16: 989)")
    ap.add_argument("--deadline_s", type=float, default=0.0,
                    help="start no new measurement after this many seconds (a leased device's time is short)")
    ap.add_argument("--row_timeout_s", type=float, default=0.0, help="kill a child (one side of a row) after this")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rows = parse_rows(args.rows or ",".join(DEFAULT_ROWS if args.device == "cpu" else DEFAULT_GPU_ROWS), ROWS)
    batches = [int(b) for b in args.batch.split(",") if b.strip()] or [None]
    import jax

    t_start = time.time()
    table, failures = [], []
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cpus ({platform.processor() or 'cpu'})",
              "device": args.device, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d %H:%M"),
              "jax": jax.__version__, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "rounds": args.rounds, "reps": args.reps, "warmup": args.warmup, "malloc": args.malloc,
              "child_env": {k: v for k, v in _child_env(args).items() if k.startswith(("MALLOC_", "GLIBC_", "JAXGEN_"))},
              "rows": table, "failures": failures}
    for batch in batches:
        for row in rows:
            b = batch
            if ROWS[row][0] == "train" and args.train_batch:
                if batch != batches[0]:
                    continue  # one train measurement per row when its batch is fixed
                b = args.train_batch
            if args.deadline_s and time.time() - t_start > args.deadline_s:
                failures.append({"row": row, "batch": b, "error": "not started: --deadline_s reached"})
                continue
            try:
                entry = measure(args, row, b)
            except RuntimeError as e:  # one failed row must not cost the rest of the run
                failures.append({"row": row, "batch": b, "error": str(e)[-3000:]})
                print(f"{row} b{b}: FAILED\n{str(e)[-1500:]}", flush=True)
                continue
            table.append(entry)
            print(describe(entry), flush=True)
            if args.out:  # after every row: a cut-off run keeps what it measured
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
