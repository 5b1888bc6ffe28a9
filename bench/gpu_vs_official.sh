#!/usr/bin/env bash
# jaxgen vs the official PyTorch code on one leased GPU, in one call (bench/vs_official.py --device=gpu).
#
# usage (from the repo root, on the GPU machine):  bash bench/gpu_vs_official.sh OFFICIAL_DIR OUT_DIR [vs_official flags]
#   OFFICIAL_DIR  holds src/{mar,VAR,1d-tokenizer} (anchor_bench's setup.sh layout) and bench_official.py (the anchor)
#   OUT_DIR       where the JSON table and the logs go
# A folder .whl/ beside the repo root, if present, is installed to /tmp/site first (the packages a bare image lacks:
# ml_collections, grain, clu, timm 0.9.12 as the anchor pins, omegaconf; see docs/benchmarks.md for the list).
# An import check runs first: where jaxgen cannot run on the device at all, the script stops within seconds
# instead of spending the lease on official rows it cannot compare. XLA:GPU compiles slowly there (2026-12-04, H200,
# jax 0.11.2: var_tiny's sampler 100 s, RAR-B's 93 s, VAR-d16's > 200 s), so give rows a generous --row_timeout_s.
set -uo pipefail
official=$1; out=$2; shift 2
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export JAXGEN_ANCHOR_BENCH=$official/bench_official.py PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, torch, flax; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())" \
  | tee -a "$out/gpu.txt"
# fail fast where jaxgen cannot even import or see the device (a compiled smoke test costs ~2 min of the lease there)
python3 -c "import jax, jaxgen.families, jaxgen.train.trainer; assert jax.devices()[0].platform == 'gpu', jax.devices()" \
  || { echo "jaxgen does not import or sees no GPU"; exit 1; }
# PROBE=1: first pick XLA:GPU flags that compile faster (bench/gpu_compile_probe.py, ~3-5 min), then use them
if [ "${PROBE:-0}" = 1 ]; then
  python3 bench/gpu_compile_probe.py --out="$out/compile_probe.json" --best="$out/best_xla_flags" 2>&1 \
    | tee "$out/compile_probe.log"
  export XLA_FLAGS="${XLA_FLAGS:-} $(cat "$out/best_xla_flags" 2>/dev/null)"
  echo "XLA_FLAGS=$XLA_FLAGS"
fi
# one compilation cache for every child: a row's later rounds reuse the programs its first round compiled
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxgen_xla_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
python3 bench/vs_official.py --device=gpu --dtype=bfloat16 --peak_tflops=989 --official_src="$official/src" \
  --official_python=python3 --out="$out/vs_official_gpu.json" "$@" 2>&1 | tee "$out/vs_official_gpu.log"
