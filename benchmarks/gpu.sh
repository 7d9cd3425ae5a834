#!/usr/bin/env bash
# One GPU session: the GPU tests, then issue 23's tracked FC-784 table (gpu_tracking.py), then the
# ResNet-18 H·v and tracking tables, then the GPT ones (issue 14: H·v / gradient, block cost per
# vector, tracked top-k for a 4.8M-parameter gpt), then GPT-2 under FSDP2 (issue 25).
# Usage (repository root): bash benchmarks/gpu.sh [ResNet budget s, default 270] [GPT budget s, 180]
# Logs go to $OUT (or /tmp/gpu-out): pytest.log, gpu.log.
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.log"
python3 -c "import torch; print('torch', torch.__version__)" 2>&1 | tee -a "$OUT/gpu.log"
timeout 120 python3 -m pytest -m gpu tests/test_gpu.py -q -rfE -p no:cacheprovider \
    >"$OUT/pytest.log" 2>&1
echo "pytest exit $?" | tee -a "$OUT/gpu.log"
tail -n 25 "$OUT/pytest.log"
# Issue 23 first: tracked top-20 of FC-784, every solver mode against cold eigsh (target: the
# folded solver chosen by warm="auto" at <= 0.3 of eigsh).
timeout 300 python3 benchmarks/gpu_tracking.py --count 10 --seconds 200 2>&1 | tee -a "$OUT/gpu.log"
python3 benchmarks/gpu.py --budget "${1:-270}" ${GPU_ARGS:-} 2>&1 | tee -a "$OUT/gpu.log"
python3 benchmarks/gpu_gpt.py --budget "${2:-180}" 2>&1 | tee -a "$OUT/gpu.log"
# Issue 25: GPT-2 small under FSDP2 on one GPU (world 1, NCCL), bf16, finite differences; the
# script itself skips without CUDA.
timeout 600 python3 benchmarks/gpu_fsdp.py ${FSDP_ARGS:-} 2>&1 | tee -a "$OUT/gpu.log"
