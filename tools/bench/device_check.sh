#!/usr/bin/env bash
# One prepared call for a lent GPU (the `device` tool): verify the compiled kernels, then time
# them, everything into $OUT. Budget ~9 min of a 10-min call; each step has its own limit so a
# slow autotune cannot eat the others. Usage (from the repo root, on the device):
#   bash tools/bench/device_check.sh            # then copy the tables into packages/dcvg-kernels/README.md
# The device image brings its own torch/triton; the packages run from source via PYTHONPATH.
set -u
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONPATH=packages/dcvg-kernels/src:packages/dcae-v/src${PYTHONPATH:+:$PYTHONPATH}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/setup.txt" 2>&1
timeout 150 python tools/bench/kernels.py --check > "$OUT/check.txt" 2>&1; echo "check rc $?" >> "$OUT/check.txt"
timeout 150 python tools/bench/kernels.py --what attention --json "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
echo "attention rc $?" >> "$OUT/attention.txt"
timeout 120 python tools/bench/kernels.py --what conv --resolutions 720p --json "$OUT/conv720.json" > "$OUT/conv720.txt" 2>&1
echo "conv 720p rc $?" >> "$OUT/conv720.txt"
timeout 110 python tools/bench/kernels.py --what conv --resolutions 2160p --json "$OUT/conv2160.json" > "$OUT/conv2160.txt" 2>&1
echo "conv 2160p rc $?" >> "$OUT/conv2160.txt"
tail -n 40 "$OUT"/*.txt
