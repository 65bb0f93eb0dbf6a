#!/bin/bash
# CPU check (issue 13): the benchmarks behind the README's speed table, one after another on
# an otherwise idle machine, and one line per benchmark with its ratio at the end. The runs
# alternate plain and tus rounds where a script offers it (a shared CPU drifts by a few
# percent within a minute). Budget: ~30 minutes on 2 cores, ~8 of them the whole CV at the
# reference's scale (220 patients).
#
#   bash benchmarks/cpu_check.sh [OUT_DIR]      # logs in OUT_DIR, summary on stdout
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
PY="${PYTHON:-.venv/bin/python}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

run() {
    local name=$1
    shift
    local start=$SECONDS
    timeout "${STEP_TIMEOUT:-900}" "$PY" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name (rc $rc, $((SECONDS - start)) s): $(grep -h 'ratio' "$OUT/$name.log" | tr '\n' ' ')" | tee -a "$SUMMARY"
}

grep -m1 'model name' /proc/cpuinfo
run finetune benchmarks/finetune_throughput.py --rounds 3
run finetune_b16 benchmarks/finetune_throughput.py --rounds 3 --batch-size 16 --steps 30
# 20 steps: a fit shorter than channels_last auto's 16-step trial would stay NCHW untimed.
run finetune_128 benchmarks/finetune_throughput.py --image-size 128 --steps 20
run pretrain_simclr benchmarks/pretrain_throughput.py --method simclr --rounds 2
run pretrain_mae benchmarks/pretrain_throughput.py --method mae --rounds 2
run diffusion benchmarks/diffusion_throughput.py
run cv_wall benchmarks/cv_wall.py
run cv_wall_220_patients benchmarks/cv_wall.py --patients 220 --rounds 2
run cv_wall_2_epochs benchmarks/cv_wall.py --epochs 2 --rounds 3
run cv_fixed_cost benchmarks/cv_wall.py --fixed-cost --rounds 3
run predict benchmarks/predict_throughput.py --images 128 --repeats 3
echo "logs: $OUT"
