#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with CUDA (e.g. the device tool's lent GPU): the CUDA
# tests that skip on CPU-only CI, then the GPU figures the issues name. Every output goes to $OUT (default
# ./gpu_checks). About 6-8 minutes on one H100/H200; no step downloads anything.
#   bash scripts/setup.sh && OUT=/tmp/gpu bash scripts/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_checks}
mkdir -p "$OUT"
PY=.venv/bin/python
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
# 1. the CUDA code paths (tests that skip without a GPU)
timeout 300 $PY -m pytest -q -rs tests/test_device.py tests/test_attack_core.py tests/test_corruptions.py -k cuda \
  > "$OUT/cuda_tests.txt" 2>&1
# 2. issue 7: certify sampling of ResNet-50 at 224 px (fp32, bf16) vs forward-only and the plain loop; the
#    seconds per image at n = 100,000; the compile gain; per-batch adaptation at rho 1 and 0.5
for p in fp32 bf16; do
  timeout 240 $PY benchmarks/bench_certify.py --device cuda --arch resnet50 --image-size 224 --precision $p \
    --batch 500 --samples 10000 --repeats 3 > "$OUT/bench_certify_resnet50_$p.txt" 2>&1
done
timeout 180 $PY benchmarks/bench_adapt.py --device cuda --arch resnet50 --rho 1,0.5 > "$OUT/bench_adapt_resnet50.txt" 2>&1
# 3. issue 9: attack cost per iteration on the GPU; issue 12: online adaptation cost at batch 1 and 8
timeout 120 $PY benchmarks/bench_attack.py --device cuda --batch-size 500 > "$OUT/bench_attack.txt" 2>&1
timeout 120 $PY benchmarks/bench_stream.py --device cuda --skip-accuracy > "$OUT/bench_stream.txt" 2>&1
tail -n 3 "$OUT"/*.txt
