#!/usr/bin/env bash
# One GPU's batch (the numbers in the README marked "H100"): the binary,
# Omniglot and CIFAR-10 reproductions trained side by side on one GPU, then the
# meta-training speed benchmark alone on it. Needs the data zips under .gpu-data/ and,
# where the machine lacks them, wheels of typer/piqa/pydantic under .whl/.
#   MINUTES=4.5 OUT=gpu-out examples/gpu_batch.sh
# The batch behind docs/results/h100-2026-11-26 ran this at commit bd4cbff: then with a
# third binary model (rnn-64 at lr 3e-3) and the rnn's written layer reading x, not 2x - 1.
set -u
MINUTES=${MINUTES:-4.5}
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
work=$(mktemp -d)
mkdir -p "$work"
source examples/gpu_env.sh
export OMP_NUM_THREADS=2
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, typer; print('torch', torch.__version__, 'typer', typer.__version__)"
    nproc
} >"$work/machine.txt" 2>&1
# Nine models share the GPU: the binary ones first in importance, then the image ones.
for spec in binary:rnn-64,rnn-96 omniglot:conv-2,conv-4,conv-14,fc-18,fc-63 \
    cifar10:conv-4; do
    experiment=${spec%%:*}
    timeout 400 python3 examples/reproduce.py "$experiment" --runs "${spec#*:}" --jobs 5 \
        --minutes "$MINUTES" --device cuda --out "$work/$experiment" >"$work/$experiment.out" 2>&1 &
done
wait
timeout 120 python3 examples/bench.py --steps 3 --device cuda --json "$work/bench.json" >"$work/speed.out" 2>&1
timeout 120 python3 examples/bench.py --protocols report,paper --episodes 8 --steps 3 --device cuda \
    --json "$work/bench-8ep.json" >>"$work/speed.out" 2>&1
tar czf "$OUT/results.tgz" -C "$work" --exclude='*.safetensors' .
for model in binary/rnn-64 binary/rnn-96 omniglot/conv-4 cifar10/conv-4; do
    cp "$work/$model/model.safetensors" "$OUT/$(echo "$model" | tr / -).safetensors" 2>/dev/null
done
ls -la "$OUT"
cat "$work/machine.txt" "$work/speed.out"
tail -n 25 "$work"/*.out
