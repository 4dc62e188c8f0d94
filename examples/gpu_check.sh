#!/usr/bin/env bash
# What a GPU runs to check the CUDA-graph fast path: one command, under 8 minutes on
# one GPU.
#   1. the CUDA tests of tests/test_fast_path.py (a replayed step gives an eager step's
#      parameters for conv/fc/rnn and both orders, 50 replayed steps follow eager
#      training, replayed write + read give eager's, a failed capture falls back);
#   2. examples/bench.py, eager against graphs on the same GPU: report, paper and binary
#      protocols with one episode per step.
# Needs the Omniglot zips under .gpu-data/omniglot/ and, where the machine lacks them,
# wheels of the Python dependencies under .whl/ (as examples/gpu_batch.sh):
#   OUT=gpu-out examples/gpu_check.sh
set -u
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
source examples/gpu_env.sh
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__)"
    git rev-parse --short HEAD 2>/dev/null
} | tee "$OUT/machine.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fast_path.py 2>&1 \
    | tail -n 15 | tee "$OUT/tests.txt"
timeout 120 python3 examples/bench.py --protocols report,paper,binary --steps 3 --device cuda \
    --cuda-graph off,on --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
