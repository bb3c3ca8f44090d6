#!/usr/bin/env bash
# One device call that checks the CUDA-graph fast path and measures it (see README, Speed).
# Usage on a GPU machine from the repository root: bash benchmarks/gpu_check.sh [OUT_DIR]
set -euo pipefail
out=${1:-${OUT:-.}}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q tests/test_fast_path.py tests/test_losses.py 2>&1 | tail -3
python3 benchmarks/bench.py --suite --device cuda --steps 50 --warmup 10 --repeats 3 --json "$out/bench.json"
