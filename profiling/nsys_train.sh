#!/usr/bin/env bash
# Nsight Systems capture of chosen training steps.
#
# The trainer calls cudaProfilerStart before step START and cudaProfilerStop after step STOP
# (--cuda-profile-steps START:STOP), and nsys records only that range (--capture-range=cudaProfilerApi), so
# start-up, data generation, cudnn autotuning and torch.compile stay out of the report. NVTX ranges name each
# phase of a step: data, forward, loss, backward, optimizer (and eval_forward).
#
#   profiling/nsys_train.sh                          # ResNet-50, 112 px, bf16, channels-last, steps 30-40
#   START=100 STOP=110 profiling/nsys_train.sh --trunk vgg16 --image-size 224 --batch-size 128
#
# Extra arguments go to `python -m fbn_fast.train` (they override the ones below). Output:
# profiling/results/nsys_train-<time>.nsys-rep (open it in the Nsight Systems GUI, or `nsys stats` it).
set -euo pipefail
cd "$(dirname "$0")/.."

START=${START:-30}
STOP=${STOP:-40}
OUT=${OUT:-profiling/results/nsys_train-$(date +%Y%m%d-%H%M%S)}

if ! command -v nsys >/dev/null 2>&1; then
    echo "nsys (NVIDIA Nsight Systems) is not on PATH; install it or use profiling/torch_profile.py" >&2
    exit 1
fi
mkdir -p "$(dirname "$OUT")"

nsys profile \
    --capture-range=cudaProfilerApi \
    --capture-range-end=stop \
    --trace=cuda,nvtx,osrt,cudnn,cublas \
    --cuda-memory-usage=true \
    --sample=none \
    --force-overwrite=true \
    --output="$OUT" \
    python -m fbn_fast.train \
        --name "nsys-$(date +%Y%m%d-%H%M%S)" \
        --trunk resnet50 --image-size 112 --synth-image-size 112 --batch-size 256 \
        --amp-dtype bf16 --channels-last --nvtx \
        --steps $((STOP + 5)) --warmup-steps 10 --log-every 10 --ckpt-every 100000 \
        --no-evaluate --no-plots \
        --cuda-profile-steps "${START}:${STOP}" \
        "$@"
echo "report: ${OUT}.nsys-rep" >&2
