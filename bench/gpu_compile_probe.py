"""Which XLA:GPU flags cut jaxgen's compile time on this GPU, and what they cost at run time.

On the H200 lease of 2026-12-04 compiling `var_tiny`'s sampler (a model that then samples in 37 ms) took 100.8 s and
RAR-B's 93 s, with XLA's autotuner warning 'Delay kernel timed out' while it timed candidate kernels: the lease went
on compilation. This compiles and runs one small sampler per flag set, each in its own process (XLA_FLAGS are read
once per process), prints compile / call seconds and writes the fastest-compiling set whose call time stays within
--max_slowdown of the fastest call to --best (for `XLA_FLAGS=$(cat best) bash bench/gpu_vs_official.sh ...`).
'default' is left out of the default list to save lease time: it is the 2026-12-04 figure above.

  python bench/gpu_compile_probe.py --out=probe.json --best=best_xla_flags
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_official import run_throughput  # noqa: E402

VARIANTS = {
    "default": "",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "autotune_0": "--xla_gpu_autotune_level=0",
    "autotune_1": "--xla_gpu_autotune_level=1",
    "in_process_ptxas": "--xla_gpu_enable_libnvptxcompiler=true",
}
PROBE = ["--config=configs/var_tiny.py", "--what=sample", "--batch=8", "--repeats=3", "--warmup=1"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="no_triton_gemm,autotune_0,in_process_ptxas",
                    help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--max_slowdown", type=float, default=1.15)
    ap.add_argument("--out", default="")
    ap.add_argument("--best", default="", help="write the chosen XLA_FLAGS here")
    args = ap.parse_args(argv)
    results = {}
    for name in args.variants.split(","):
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + VARIANTS[name]).strip())
        try:
            r = run_throughput(name, PROBE, env)
        except RuntimeError as e:  # an unknown flag aborts XLA's start-up: record it, try the next
            results[name] = {"flags": VARIANTS[name], "error": str(e)[-500:]}
            print(f"{name:18s} FAILED {str(e)[-200:]}", flush=True)
            continue
        results[name] = {"flags": VARIANTS[name], "compile_s": r["compile_s"], "call_s": r["median_s"]}
        print(f"{name:18s} compile {r['compile_s']:7.1f} s  call {1000 * r['median_s']:8.2f} ms", flush=True)
    ok = {k: v for k, v in results.items() if "error" not in v}
    best = "default"
    if ok:
        limit = min(v["call_s"] for v in ok.values()) * args.max_slowdown
        best = min((k for k, v in ok.items() if v["call_s"] <= limit), key=lambda k: ok[k]["compile_s"])
    print(f"best: {best} ({VARIANTS[best] or 'no flags'})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"probe": PROBE, "results": results, "best": best}, f, indent=1)
    if args.best:
        with open(args.best, "w") as f:
            f.write(VARIANTS[best])
    return 0


if __name__ == "__main__":
    sys.exit(main())
