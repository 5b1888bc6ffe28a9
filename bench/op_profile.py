"""Sum a jax.profiler trace per XLA op: where a compiled program's time goes on XLA:CPU.

  XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python bench/throughput.py ... --profile_dir=/tmp/prof
  python bench/op_profile.py /tmp/prof [--top=30] [--group]

Reads the newest `*.trace.json.gz` under the directory; prints total milliseconds, call count and share of every
op (thunk) event, Python and runtime frames left out. --group merges numbered copies (`ynn_fusion.12` and
`ynn_fusion.40` -> `ynn_fusion`): which KIND of op costs most. Thunks of one program can overlap on the two
threads, so shares are of the summed op time, not of wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

RUNTIME = ("ThunkExecutor", "ThreadpoolListener", "PjitFunction", "CommonPjRt", "ParseArguments", "end: ")


def op_times(trace_dir: str, group: bool = False):
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}")
    events = json.load(gzip.open(paths[-1]))["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith("$") or name.startswith(RUNTIME) or name.startswith("while"):
            continue
        key = re.sub(r"\.\d+$", "", name) if group else name
        total[key] += e.get("dur", 0) / 1e3
        count[key] += 1
    return total, count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace_dir")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--group", action="store_true")
    args = ap.parse_args()
    total, count = op_times(args.trace_dir, args.group)
    whole = sum(total.values()) or 1.0
    print(f"{'ms':>10} {'calls':>7} {'share':>6}  op   (summed op time {whole:.1f} ms)")
    for name, ms in total.most_common(args.top):
        print(f"{ms:10.1f} {count[name]:7d} {100 * ms / whole:5.1f}%  {name}")


if __name__ == "__main__":
    main()
