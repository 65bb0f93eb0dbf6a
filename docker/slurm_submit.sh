#!/bin/bash
# Submit a tus stage to SLURM with the site's partition, account and GPU type:
#
#   GPU_TYPE=l40s PARTITION=gpu ACCOUNT=myproj docker/slurm_submit.sh pretrain|diffusion|finetune-cv [tus options]
#
# GPU_TYPE (e.g. l40s, a100; empty: any GPU) goes into --gres=gpu:TYPE:N, with N the GPUs the
# stage's script uses (pretrain 2, diffusion 1, finetune-cv GPUS_PER_JOB per array task).
# PARTITION, ACCOUNT and TIME (e.g. 24:00:00) become --partition, --account and --time.
# finetune-cv: makes the CV run dir here (`tus finetune-cv --prepare`: the manifest is checked
# and the folds drawn before anything is queued), submits one array task per GPUS_PER_JOB fold x
# seed runs, then a job that joins them into runs.csv and the summary once every task ended.
# SBATCH (default sbatch) is the command used, e.g. SBATCH="echo sbatch" to print the calls.
set -euo pipefail

STAGE="${1:?usage: docker/slurm_submit.sh pretrain|diffusion|finetune-cv [tus options]}"
shift
DOCKER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
read -r -a SUBMIT <<< "${SBATCH:-sbatch}"
# The scripts find docker/slurm_common.sh (and .venv) here; sbatch passes the environment on.
export TUS_HOME="${TUS_HOME:-$(dirname "${DOCKER_DIR}")}"
SITE=()
[[ -n "${PARTITION:-}" ]] && SITE+=("--partition=${PARTITION}")
[[ -n "${ACCOUNT:-}" ]] && SITE+=("--account=${ACCOUNT}")
[[ -n "${TIME:-}" ]] && SITE+=("--time=${TIME}")

gres() {  # gres N -> --gres=gpu[:TYPE]:N
    echo "--gres=gpu:${GPU_TYPE:+${GPU_TYPE}:}$1"
}

case "${STAGE}" in
    pretrain)
        "${SUBMIT[@]}" "${SITE[@]}" "$(gres 2)" "${DOCKER_DIR}/slurm_2xl40s.sbatch" "$@"
        ;;
    diffusion)
        "${SUBMIT[@]}" "${SITE[@]}" "$(gres 1)" "${DOCKER_DIR}/slurm_diffusion.sbatch" "$@"
        ;;
    finetune-cv)
        G="${GPUS_PER_JOB:-1}"
        CPUS="${CPUS_PER_TASK:-8}"
        # The run dir's config is what every task runs: GPU training and loader workers go in now.
        PREPARED="$(tus finetune-cv --prepare --trainer.accelerator=gpu --trainer.devices=1 "--data.num_workers=$(( CPUS / G > 1 ? CPUS / G - 1 : 0 ))" "$@")"
        echo "${PREPARED}"
        RUN_DIR="$(sed -n 's/^run dir: //p' <<< "${PREPARED}")"
        TASKS="$(sed -n 's/^tasks: \([0-9]*\).*/\1/p' <<< "${PREPARED}")"
        JOBS=$(( (TASKS + G - 1) / G ))
        ARRAY="$("${SUBMIT[@]}" --parsable "${SITE[@]}" "$(gres "${G}")" "--cpus-per-task=${CPUS}" "--array=0-$(( JOBS - 1 ))" \
            "--export=ALL,GPUS_PER_JOB=${G},TUS_TASKS=${TASKS}" "${DOCKER_DIR}/slurm_finetune_cv.sbatch" "${RUN_DIR}")"
        echo "array job ${ARRAY%%;*}: ${TASKS} fold x seed runs in ${JOBS} tasks"
        JOIN="$("${SUBMIT[@]}" --parsable "${SITE[@]}" --job-name=tus-finetune-cv-join --cpus-per-task=2 --time=01:00:00 \
            "--dependency=afterany:${ARRAY%%;*}" "${DOCKER_DIR}/slurm_finetune_cv.sbatch" --join "${RUN_DIR}")"
        echo "join job ${JOIN%%;*}: writes ${RUN_DIR}/summary.md, or names the runs that are missing"
        ;;
    *)
        echo "docker/slurm_submit.sh: unknown stage '${STAGE}' (pretrain, diffusion or finetune-cv)" >&2
        exit 2
        ;;
esac
