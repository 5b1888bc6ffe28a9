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
balloon driver reports free pages to the host (this one) costs ~2 us/KB. --malloc=default gives both glibc's
defaults (jaxgen's child then gets JAXGEN_HOST_MALLOC=system).
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
F32 = ["--config.compute_dtype=float32"]

# official measurement -> the jaxgen throughput.py flags doing the same work (official settings, see anchor README)
ROWS = {
    "rar_b_sample": ["--config=configs/rar_b.py", "--what=sample_tokens", "--batch=2", *F32],
    # the anchor's RAR step: AdamW without gradient clipping (the recipe clips at 1.0; here the same work as official)
    "rar_b_train": ["--config=configs/rar_b.py", "--what=train", "--config.batch_size=4", *F32,
                    "--config.optim.grad_clip=0"],
    # the anchor's MAR and VAR steps: AdamW, no clipping, no EMA (the recipes clip and MAR keeps an EMA)
    "mar_b_train": ["--config=configs/mar_b.py:cached", "--what=train", "--config.batch_size=4", *F32,
                    "--config.optim.grad_clip=0", "--config.optim.ema_decay=0"],
    "mar_b_sample_iter8": ["--config=configs/mar_b.py", "--what=sample_tokens", "--batch=2", *F32,
                           "--config.sample.num_iter=8", "--config.sample.cfg=3.0"],
    "mar_b_sample_iter16": ["--config=configs/mar_b.py", "--what=sample_tokens", "--batch=2", *F32,
                            "--config.sample.num_iter=16", "--config.sample.cfg=3.0"],
    # the papers' step counts (anchor: cfg 3.0 linear, 100 DDPM steps, latents only)
    "mar_b_sample_iter64": ["--config=configs/mar_b.py", "--what=sample_tokens", "--batch=2", *F32,
                            "--config.sample.num_iter=64", "--config.sample.cfg=3.0"],
    "mar_b_sample_iter256": ["--config=configs/mar_b.py", "--what=sample_tokens", "--batch=2", *F32,
                             "--config.sample.num_iter=256", "--config.sample.cfg=3.0"],
    "var_d16_sample": ["--config=configs/var_d16.py", "--what=sample", "--batch=2", *F32],
    "var_d16_train": ["--config=configs/var_d16.py", "--what=train", "--config.batch_size=2", *F32,
                      "--config.optim.grad_clip=0"],
}

DEFAULT_ROWS = ("mar_b_sample_iter64", "mar_b_sample_iter256", "var_d16_sample", "rar_b_sample", "mar_b_train",
                "var_d16_train", "rar_b_train")
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
    return env


def _plan(args, row):
    rounds, reps, warmup = LONG.get(row, (args.rounds, args.reps, args.warmup))
    return min(rounds, args.rounds), min(reps, args.reps), min(warmup, args.warmup)


def _official(args, row, reps, warmup):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [args.official_python, OFFICIAL_ROWS, "--src", args.official_src, "--only", row, "--reps", str(reps),
               "--warmup", str(warmup), "--threads", str(args.threads), "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(args))
        if proc.returncode != 0 or not os.path.exists(out):
            raise SystemExit(f"official {row} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        result = json.load(open(out))
    if result.get("failures"):
        raise SystemExit(f"official {row} failed: {result['failures'][0]['log_tail'][-2000:]}")
    meas = next(m for m in result["results"] if m["name"] == row)
    r = next(x for x in meas["rows"] if x["name"] == row)
    return {"times_s": r["times_s"], "median_s": r["median_s"], "peak_rss_mb": meas["peak_rss_mb"],
            "host": result["host"], "commits": result["official_commits"]}


def run_throughput(name, flags, env=None):
    """bench/throughput.py with `flags` in a child process -> its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "throughput.py"), *flags,
                               f"--json={out}"], cwd=REPO, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"jaxgen {name} failed:\n{proc.stderr[-3000:]}")
        return json.load(open(out))


def parse_rows(text, known):
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in known]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(known)}")
    return rows


def _jaxgen(args, row, reps, warmup):
    flags = ROWS[row] + [f"--steps={reps}", f"--repeats={reps}", f"--warmup={warmup}"]
    return run_throughput(row, flags, _child_env(args))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official_src", required=True, help="/tmp/official/src of the anchor_bench set-up")
    ap.add_argument("--official_python", required=True, help="its venv's python")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--rounds", type=int, default=2, help="official / jaxgen alternations per row")
    ap.add_argument("--reps", type=int, default=2, help="timed calls per side per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per side per round (train: 1 step)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses every core)")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="'keep': both children keep freed memory (see above); 'default': glibc's defaults")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rows = parse_rows(args.rows, ROWS)
    import jax

    table = []
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cpus ({platform.processor() or 'cpu'})",
              "date": time.strftime("%Y-%m-%d %H:%M"), "jax": jax.__version__,
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "rounds": args.rounds,
              "reps": args.reps, "warmup": args.warmup, "malloc": args.malloc,
              "child_env": KEEP_FREED_MEMORY if args.malloc == "keep" else {}, "rows": table}
    for row in rows:
        official, ours = [], []
        rounds, reps, warmup = _plan(args, row)
        for _ in range(rounds):
            official.append(_official(args, row, reps, warmup))
            ours.append(_jaxgen(args, row, reps, warmup))
        o_times = [t for r in official for t in r["times_s"]]
        j_times = [t for r in ours for t in r["times_s"]]
        o_med, j_med = statistics.median(o_times), statistics.median(j_times)
        flops = ours[-1].get("flops")
        entry = {"row": row, "official_median_s": o_med, "jaxgen_median_s": j_med, "ratio": o_med / j_med,
                 "official_times_s": o_times, "jaxgen_times_s": j_times,
                 "official_peak_rss_mb": max((r["peak_rss_mb"] or 0) for r in official),
                 "jaxgen_peak_rss_mb": max(r["peak_rss_mb"] for r in ours),
                 "jaxgen_compile_s": ours[-1]["compile_s"], "jaxgen_flags": ROWS[row],
                 "rounds": rounds, "reps": reps, "warmup": warmup, "flops_source": ours[-1].get("flops_source"),
                 "counted_gflop": flops / 1e9 if flops else None,
                 "jaxgen_gflops_per_s": flops / j_med / 1e9 if flops else None,
                 "official_gflops_per_s": flops / o_med / 1e9 if flops else None}
        table.append(entry)
        print(f"{row:22s} [{rounds}x{reps}, warmup {warmup}] official {o_med:8.2f} s  jaxgen {j_med:8.2f} s  "
              f"ratio {o_med / j_med:5.2f}x  RSS {entry['official_peak_rss_mb']:.0f} / {entry['jaxgen_peak_rss_mb']:.0f} MB  "
              f"compile {entry['jaxgen_compile_s']} s"
              + (f"  GFLOP/s {entry['official_gflops_per_s']:.1f} / {entry['jaxgen_gflops_per_s']:.1f}"
                 if flops else ""), flush=True)
        result.update(official_host=official[-1]["host"], official_commits=official[-1]["commits"])
        if args.out:  # after every row: a cut-off run keeps what it measured
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
