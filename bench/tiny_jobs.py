"""A bench row for each tiny job of docs/results.md: the train step of every tiny config at its own batch (steps/s)
and the sampler of every tiny generator at its eval batch (images/s), each through bench/throughput.py in its own
process (compile apart), printed next to the figures docs/results.md recorded for the whole jobs. A regression in
a tiny job's wall time shows here first, in about ten minutes on the 2-core VM.

  python bench/tiny_jobs.py --out=bench/results/tiny_jobs_cpu.json
  python bench/tiny_jobs.py --rows=mar_tiny_train,mar_tiny_sample
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_official import parse_rows, run_throughput  # noqa: E402

# the sub-second samplers time 5 calls: one slow call of this VM's neighbours then moves no median
# row -> (throughput.py flags, docs/results.md's figure for the same work: (value, unit, where))
ROWS = {
    "kl_vae_tiny_train": (["--config=configs/kl_vae_tiny.py", "--what=train", "--steps=20"],
                          (3.9, "steps/s", "MAR job, stage 1")),
    "mar_tiny_train": (["--config=configs/mar_tiny.py", "--what=train", "--steps=20"],
                       (3.1, "steps/s", "MAR job, stage 2")),
    "mar_tiny_sample": (["--config=configs/mar_tiny.py", "--what=sample", "--batch=250", "--warmup=0", "--repeats=1"],
                        (5.3, "images/s", "2026-12-01; 3.3 on 2026-12-02")),
    "msvq_tiny_train": (["--config=configs/msvq_tiny.py", "--what=train", "--steps=20"],
                        (1200 / (5.3 * 60), "steps/s", "VAR job, stage 1: 1,200 steps in 5.3 min")),
    "var_tiny_train": (["--config=configs/var_tiny.py", "--what=train", "--steps=20"],
                       (6.6, "steps/s", "VAR job, stage 2")),
    "var_tiny_sample": (["--config=configs/var_tiny.py", "--what=sample", "--batch=250", "--repeats=5"],
                        (87.1, "images/s", "eval incl. compilation")),
    "maskgit_vqgan_tiny_train": (["--config=configs/maskgit_vqgan_tiny.py", "--what=train", "--steps=20"],
                                 (5.9, "steps/s", "RAR job, stage 1 (4.4 on 2026-12-02)")),
    "rar_tiny_train": (["--config=configs/rar_tiny.py", "--what=train", "--steps=20"],
                       (2.6, "steps/s", "RAR job, stage 2")),
    "rar_tiny_sample": (["--config=configs/rar_tiny.py", "--what=sample", "--batch=250", "--repeats=5"],
                        (84.0, "images/s", "eval incl. compilation")),
    "nat_tiny_train": (["--config=configs/nat_tiny.py", "--what=train", "--steps=20"],
                       (2.25, "steps/s", "NAT job, stage 2")),
    "nat_tiny_sample": (["--config=configs/nat_tiny.py", "--what=sample", "--batch=250", "--repeats=5"],
                        (27.5, "images/s", "eval incl. compilation")),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rows = parse_rows(args.rows, ROWS)
    table = []
    for name in rows:
        r = run_throughput(name, ROWS[name][0])
        value, unit = (r["steps_per_s"], "steps/s") if r["what"] == "train" else (r["images_per_s"], "images/s")
        ref, ref_unit, where = ROWS[name][1]
        entry = {"row": name, "value": value, "unit": unit, "median_s": r["median_s"], "compile_s": r["compile_s"],
                 "peak_rss_mb": r["peak_rss_mb"], "results_md": ref, "results_md_note": where,
                 "flags": ROWS[name][0]}
        table.append(entry)
        print(f"{name:26s} {value:8.2f} {unit:9s} (docs/results.md {ref:.2f} {ref_unit}, {where})  "
              f"compile {r['compile_s']} s  RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": r["machine"], "rows": table}, f,
                          indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
