#!/usr/bin/env bash
# One lent-GPU run of the recipe omniglot-32-ebmm (the paper's mechanism on Omniglot: 16
# to 64 characters per memory written into the kv energy by its 5 learned delta-rule
# steps, gradient steps on E in closed form, and read by projected gradient descent on E,
# the kv term and a learned prior energy, not by its decoder), under 8 minutes:
#   1. `ebmm train --recipe omniglot-32-ebmm` on CUDA for MINUTES (default 5), from a
#      fresh model or, with INIT=FILE, from a trained one's weights (`--init`: a CPU
#      run's model.safetensors copied into the repository, e.g. .gpu-runs/). Not
#      `--resume`: a CPU run samples 64 distinct classes through learn2learn, which that
#      machine lacks, and a resumed run keeps its sampler;
#   2. `ebmm compare` of the model reached on the evaluation alphabets: 64 characters per
#      memory, occlude:16, 50 episodes, beside its unwritten control, the query and the
#      pixel nearest neighbour.
# Shots 0 in both (random characters rather than 64 distinct classes; train's --set
# shots=0, compare's --shots 0): learn2learn, the class sampler, is not on that machine.
# Needs the Omniglot zips under .gpu-data/omniglot/ (images_background.zip,
# images_evaluation.zip) and a piqa wheel under .whl/ (SSIM in the
# held-out metrics), both carried:
#   OUT=$OUT examples/gpu_ebmm.sh      (on the device machine, $OUT is the folder that comes back)
# DEVICE=cpu MINUTES=0.2 runs the same wiring on a CPU.
set -u
OUT=${OUT:?set OUT}
MINUTES=${MINUTES:-5}
DEVICE=${DEVICE:-cuda}
INIT=${INIT:-}
work=$(mktemp -d)
source examples/gpu_env.sh
export OMP_NUM_THREADS=4
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, piqa; print('torch', torch.__version__, 'piqa', piqa.__version__)"
    git rev-parse --short HEAD 2>/dev/null
    date -u
} 2>&1 | tee "$work/machine.txt"
# SIGTERM at the budget's end (and KILL 40 s later) still leaves a resumable folder.
stop=$(python3 -c "print(int($MINUTES * 60 + 60))")
train=(--recipe omniglot-32-ebmm --set shots=0 --minutes "$MINUTES" --eval-every 200
       --eval-episodes 10 --device "$DEVICE" --out "$work/run")
if [ -n "$INIT" ]; then
    train+=(--init "$INIT")
fi
timeout -s TERM -k 40 "$stop" python3 -m ebmm_cli train "${train[@]}" 2>&1 | tee "$work/train.out"
timeout 120 python3 -m ebmm_cli compare --model "$work/run/model.safetensors" --unwritten \
    --baselines identity,nearest --batch-size 64 --shots 0 --distortion occlude:16 \
    --episodes 50 --device "$DEVICE" --markdown "$work/compare.md" 2>&1 | tee "$work/compare.out"
# What comes back: at most 8 files of 16 MiB each, so model and checkpoint in parts (one
# part each at 4,608 floats): `cat ebmm-checkpoint.part-* >checkpoint.safetensors`.
split -b 15M "$work/run/model.safetensors" "$OUT/ebmm-model.part-"
split -b 15M "$work/run/checkpoint.safetensors" "$OUT/ebmm-checkpoint.part-"
tar czf "$OUT/results.tgz" -C "$work" --exclude='*.safetensors' .
ls -la "$OUT"
python3 - "$work/run/metrics.jsonl" <<'EOF'
import json, sys

print("step  minutes  written  unwritten  query  (held-out Hamming of 1,024)")
for line in open(sys.argv[1]):
    m = json.loads(line)
    print(f"{m['step']:5d}  {m['seconds'] / 60:7.1f}  {m['heldout_hamming']:7.1f}  "
          f"{m['heldout_unwritten_hamming']:9.1f}  {m['heldout_query_hamming']:5.1f}")
EOF
cat "$work/compare.md" 2>/dev/null
