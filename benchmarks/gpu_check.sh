#!/bin/bash
# GPU check (issues 13, 28): each benchmark on one GPU against its plain PyTorch loop (tus
# resolves precision 'auto' -> bf16-mixed, and channels_last 'auto' times both formats; the plain loops
# run in each precision and format), then a 1-GPU smoke of each stage on phantom data with
# tiny budgets. One log per step in OUT_DIR and one summary line per step (its ratio lines,
# or FAILED with the log's last line), so one failing step does not hide the others: a lent
# GPU comes for minutes, and a rerun costs a machine start. On an H200 (2026-12-04) the
# steps other than pretraining and --compile took ~4 minutes; each pretraining benchmark
# starts five fresh processes and did not finish in 110 s, so they get STEP_TIMEOUT (default
# 240 s) and can be run apart: GPU_CHECK_STEPS="pretrain_simclr pretrain_mae".
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   PYTHON=python3 bash benchmarks/gpu_check.sh out/   # an interpreter other than .venv's
#   GPU_CHECK_STEPS="diffusion stage_diffusion" bash benchmarks/gpu_check.sh   # rerun some steps
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export TUS_CACHE_DIR="$OUT/cache" WANDB_MODE=disabled PYTHONUNBUFFERED=1
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0

# run NAME CMD...: the command's output to NAME.log; one summary line with its ratios.
run() {
    local name=$1
    shift
    if [[ -n "${GPU_CHECK_STEPS:-}" && " $GPU_CHECK_STEPS " != *" $name "* ]]; then return; fi
    local start=$SECONDS
    timeout "${STEP_TIMEOUT:-240}" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local said
    said=$(grep -h -E 'ratio|img/s|images/s|peak|precision: auto|channels_last' "$OUT/$name.log" | tail -n 6 | tr '\n' ' ')
    if [[ $rc -ne 0 ]]; then
        failed=$((failed + 1))
        said="FAILED: $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1)"
    fi
    echo "$name (rc $rc, $((SECONDS - start)) s): $said" | tee -a "$SUMMARY"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$SUMMARY"
"$PYTHON" -c 'import sys, torch, lightning; print("python", sys.version.split()[0], "torch", torch.__version__, "lightning", lightning.__version__, "cuda", torch.version.cuda)' | tee -a "$SUMMARY"

FT=(benchmarks/finetune_throughput.py --device cuda --image-size 224 --batch-size 128 --steps 30 --num-workers 8)
run finetune "$PYTHON" "${FT[@]}"
run pretrain_simclr "$PYTHON" benchmarks/pretrain_throughput.py --device cuda --image-size 224 --batch-size 256 --steps 20
run pretrain_mae "$PYTHON" benchmarks/pretrain_throughput.py --method mae --device cuda --model vit_base_patch16_224 \
    --patch-size 16 --image-size 224 --batch-size 256 --decoder-depth 8 --decoder-dim 512 --steps 20
run diffusion "$PYTHON" benchmarks/diffusion_throughput.py --device cuda --image-size 128 --base-channels 128 \
    --channel-mults 1 1 2 2 --batch-size 32 --steps 20 --num-workers 8

run phantom "$PYTHON" -m tus.cli data phantom --out "$OUT/phantom"
M="$OUT/phantom/labeled/manifest.csv"
GPU=(--trainer.accelerator=gpu --trainer.devices=1 --trainer.enable_progress_bar=false --logging.wandb=false)
run stage_pretrain "$PYTHON" -m tus.cli pretrain --config pretrain/cpu "${GPU[@]}" --output_root="$OUT/runs" \
    --trainer.max_steps=20 "--data.sources=[{manifest: $M}]"
run stage_finetune_cv "$PYTHON" -m tus.cli finetune-cv --config finetune/cpu "${GPU[@]}" --output_root="$OUT/runs" \
    --data.manifest="$M" --seeds=[0] --trainer.max_epochs=2
run stage_diffusion "$PYTHON" -m tus.cli diffusion --config diffusion/cpu "${GPU[@]}" --output_root="$OUT/runs" \
    --trainer.max_steps=20 "--data.sources=[{manifest: $M}]" --data.steps_per_epoch=10
DIFFUSION_RUN=$(find "$OUT/runs" -maxdepth 1 -name '*-diffusion-*' 2>/dev/null | head -n 1)
run stage_sample "$PYTHON" -m tus.cli sample --checkpoint "${DIFFUSION_RUN:-missing-diffusion-run}" --out "$OUT/samples" \
    --n 64 --sampler respaced --steps 50 --device cuda --precision bf16 --no-progress
# Last: compilation takes the longest, and the rest should not wait on it.
run finetune_compile "$PYTHON" "${FT[@]}" --compile
echo "$failed step(s) failed; logs in $OUT" | tee -a "$SUMMARY"
exit $((failed > 0))
