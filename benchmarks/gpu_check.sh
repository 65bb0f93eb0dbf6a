#!/bin/bash
# GPU check (issue 13): each benchmark on the GPU (tus resolves precision 'auto' -> bf16-mixed
# and ChannelsLast('auto') on; the plain loops include bf16 + channels_last), then a 1-GPU
# smoke of each stage on phantom data with tiny budgets. Prints images/s and peak memory per
# image (torch.cuda.max_memory_allocated, from pretrain_throughput.py). Budget: < 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-$(mktemp -d)}"
export TUS_CACHE_DIR="$OUT/cache" WANDB_MODE=disabled
PY="${PYTHON:-.venv/bin/python}"
run() { echo "== $*"; timeout "${STEP_TIMEOUT:-100}" "$@"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
run "$PY" benchmarks/finetune_throughput.py --device cuda --image-size 224 --batch-size 128 --steps 30 --num-workers 8
run "$PY" benchmarks/finetune_throughput.py --device cuda --image-size 224 --batch-size 128 --steps 30 --num-workers 8 --compile
run "$PY" benchmarks/pretrain_throughput.py --device cuda --image-size 224 --batch-size 256 --steps 20
run "$PY" benchmarks/diffusion_throughput.py --device cuda --image-size 128 --base-channels 128 --channel-mults 1 1 2 2 --batch-size 32 --steps 20

run "$PY" -m tus.cli data phantom --out "$OUT/phantom"
M="$OUT/phantom/labeled/manifest.csv"
GPU=(--trainer.accelerator=gpu --trainer.devices=1 --trainer.enable_progress_bar=false --logging.wandb=false)
run "$PY" -m tus.cli pretrain --config pretrain/cpu "${GPU[@]}" --output_root="$OUT/runs" --trainer.max_steps=20 \
    "--data.sources=[{manifest: $M}]"
run "$PY" -m tus.cli finetune-cv --config finetune/cpu "${GPU[@]}" --output_root="$OUT/runs" --data.manifest="$M" \
    --seeds=[0] --trainer.max_epochs=2
run "$PY" -m tus.cli diffusion --config diffusion/cpu "${GPU[@]}" --output_root="$OUT/runs" --trainer.max_steps=20 \
    "--data.sources=[{manifest: $M}]" --data.steps_per_epoch=10
EXPORT=$(find "$OUT/runs" -name 'ema_unet_step*.safetensors' | head -n 1)
run "$PY" -m tus.cli sample --weights "$EXPORT" --out "$OUT/samples" --num-images 8
echo "peak GPU memory per stage is in each run's runtime.json / the benchmark lines above"
