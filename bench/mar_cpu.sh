#!/usr/bin/env bash
# MAR-B geometry on this machine's CPU at small batch (float32: bf16 matmuls are slow on most CPUs).
# Results land in bench/results/*.json; docs/benchmarks.md records them with the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
B="--config.compute_dtype=float32"
python bench/throughput.py --config=configs/mar_b.py:cached --what=train --config.batch_size=4 --steps=5 $B \
    --json=bench/results/mar_b_train_cpu.json
for it in 64 256; do
  python bench/throughput.py --config=configs/mar_b.py --what=sample --batch=2 --warmup=0 --repeats=1 $B \
      --config.sample.num_iter=$it --json=bench/results/mar_b_sample${it}_cpu.json
done
