#!/usr/bin/env bash
# The eighth session's one lent-GPU command (2026-11-28): the longest runs a 10-minute
# lease allows, beside the CUDA-graph checks that had never run on a GPU.
#   1. issue 19: the CPU run binary-any-n-contrast01-10k continued on the GPU from its
#      checkpoint (copied to .gpu-runs/binary: checkpoint.safetensors, metrics.jsonl);
#   2. issue 17: the default recipe at the paper's protocol (Omniglot 32x32, 64
#      characters, occlude:16, conv 4,616 floats), one and eight episodes per step, for
#      the same minutes. shots=0: random characters, since learn2learn (the class
#      sampler) is not installed there;
#   3. at the same time, the CUDA tests of tests/test_fast_path.py;
#   4. alone once the runs have stopped, examples/bench.py eager against graphs.
# The three trainings share the GPU, so their speeds are not solo speeds. Needs the
# Omniglot zips under .gpu-data/omniglot/ and a piqa wheel under .whl/:
#   OUT=/tmp/out MINUTES=4.5 examples/gpu_session.sh
# DEVICE=cpu MINUTES=0.3 runs the same wiring on a CPU (no tests, no bench).
set -u
OUT=${OUT:?set OUT}
MINUTES=${MINUTES:-4.5}
DEVICE=${DEVICE:-cuda}
work=/tmp/ebmm-gpu
rm -rf "$work" && mkdir -p "$work"
source examples/gpu_env.sh
export OMP_NUM_THREADS=2
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, typer; print('torch', torch.__version__, 'typer', typer.__version__)"
    git rev-parse --short HEAD 2>/dev/null
    date -u
} >"$work/machine.txt" 2>&1
# A run stops at its own --minutes or, the binary one (whose budget is 10,000 steps), at
# SIGTERM, which ebmm answers by checkpointing after the step or evaluation in hand (KILL
# 40 s later, leaving the last periodic checkpoint): each leaves a resumable folder.
stop=$(python3 -c "print(int($MINUTES * 60 + 45))")
cp -r .gpu-runs/binary "$work/binary"
timeout -s TERM -k 40 "$stop" python3 -m ebmm_cli train --out "$work/binary" --resume \
    --device "$DEVICE" >"$work/binary.out" 2>&1 &
for eps in 1 8; do
    timeout -s TERM -k 40 $((stop + 30)) python3 -m ebmm_cli train --memory conv --dataset omniglot \
        --image-size 32 --batch-size 64 --set shots=0 --distortion occlude:16 \
        --set episodes_per_step="$eps" --minutes "$MINUTES" --eval-every 100 --eval-episodes 10 \
        --device "$DEVICE" --out "$work/omni-eps$eps" >"$work/omni-eps$eps.out" 2>&1 &
done
if [ "$DEVICE" = cuda ]; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_fast_path.py \
        >"$work/tests.txt" 2>&1
fi
wait
if [ "$DEVICE" = cuda ]; then
    timeout 90 python3 examples/bench.py --protocols paper,binary --steps 3 --device cuda \
        --cuda-graph off,on --json "$work/bench.json" >"$work/bench.txt" 2>&1
fi
# What comes back: at most 8 files of 16 MiB. The binary checkpoint (27 MB) in two parts.
split -b 15M "$work/binary/checkpoint.safetensors" "$OUT/binary-checkpoint.part-"
cp "$work/binary/model.safetensors" "$OUT/binary-model.safetensors"
for eps in 1 8; do
    cp "$work/omni-eps$eps/model.safetensors" "$OUT/omni-eps$eps-model.safetensors"
done
tar czf "$OUT/results.tgz" -C "$work" --exclude='*.safetensors' .
ls -la "$OUT"
cat "$work/machine.txt"
tail -n 4 "$work"/*.out
tail -n 12 "$work/tests.txt" "$work/bench.txt" 2>/dev/null
