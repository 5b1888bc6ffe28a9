"""../shared/anchor_bench/bench_official.py with the rows the speed issue adds: MAR-B sampling at the papers' 64 and
256 AR steps (the anchor has 8 and 16). Same official call (`sample_tokens(cfg=3.0, cfg_schedule='linear')`, 100
DDPM steps, latents only), through the anchor's own `mar_sample`; nothing of the official code is here.

  python bench/official_rows.py --src /tmp/official/src --only mar_b_sample_iter64 --reps 1 --warmup 0

Every anchor flag works as documented in its README; `--warmup N` sets the untimed calls before the timed ones
(the anchor warms up once; one 256-step MAR call is ~10 minutes on a 2-core CPU, and torch has nothing to compile).
"""
from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ANCHOR = os.environ.get("JAXGEN_ANCHOR_BENCH",
                        os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "anchor_bench",
                                     "bench_official.py"))


def load_anchor():
    if not os.path.exists(ANCHOR):
        raise SystemExit(f"anchor bench not found at {ANCHOR}; set JAXGEN_ANCHOR_BENCH or put ../shared beside the repo")
    spec = importlib.util.spec_from_file_location("bench_official", ANCHOR)
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    return anchor


def register_extra_rows(anchor):
    for num_iter in (64, 256):
        anchor.measurement(f"mar_b_sample_iter{num_iter}", f"MAR-B sample_tokens num_iter={num_iter}", 2, reps=1,
                           timeout=4 * 3600)(lambda args, n=num_iter: anchor.mar_sample(args, n, 2))


def main(argv):
    anchor = load_anchor()
    register_extra_rows(anchor)
    if "--warmup" in argv:
        i = argv.index("--warmup")
        warmup = int(argv[i + 1])
        del argv[i:i + 2]
        timed = anchor.time_reps
        anchor.time_reps = lambda fn, reps, warmup_=1: timed(fn, reps, warmup=warmup)
        os.environ["JAXGEN_OFFICIAL_WARMUP"] = str(warmup)  # the worker children inherit it
    elif "JAXGEN_OFFICIAL_WARMUP" in os.environ:
        timed, warmup = anchor.time_reps, int(os.environ["JAXGEN_OFFICIAL_WARMUP"])
        anchor.time_reps = lambda fn, reps, warmup_=1: timed(fn, reps, warmup=warmup)
    # The anchor's driver re-runs its own file for each measurement; make that this file, which has the extra rows.
    anchor.__file__ = os.path.abspath(__file__)
    sys.argv = [sys.argv[0]] + argv
    anchor.main()


if __name__ == "__main__":
    main(sys.argv[1:])
