# Sourced by the SLURM scripts in docker/ (from the submit dir, after `cd "$SLURM_SUBMIT_DIR"`):
# the environment, CPU/loader settings, and the requeue bookkeeping every script shares.

# Relative paths (the venv, configs, runs/, data/) resolve from where sbatch was called.
# shellcheck disable=SC1091
source "${TUS_VENV:-${TUS_HOME:-.}/.venv}/bin/activate"
export WANDB_MODE="${WANDB_MODE:-offline}"  # sync later: see docker/README.md

# srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): pass it on explicitly.
CPUS="${SLURM_CPUS_PER_TASK:-8}"
export OMP_NUM_THREADS="${CPUS}"
LOADER_WORKERS=$(( CPUS > 1 ? CPUS - 1 : 0 ))  # one core stays with the training process

# Preemption and time limits (#SBATCH --signal=USR1@90 --requeue): on SIGUSR1 tus saves
# checkpoints/last.ckpt where the run resumes exactly, stops (exit 138) and requeues this job
# (`scontrol requeue`); on SIGTERM (scancel, preemption) it saves and exits 143. tus writes the
# run dir a new run makes into TUS_RUN_DIR_FILE; a requeued job (same SLURM_JOB_ID,
# SLURM_RESTART_COUNT > 0) finds it there and resumes that run dir.
export TUS_RUN_DIR_FILE="${TUS_STATE_DIR:-.tus-slurm}/${SLURM_JOB_ID:-local}.run_dir"
if [[ -z "${TUS_RESUME:-}" && -s "${TUS_RUN_DIR_FILE}" ]]; then
    TUS_RESUME="$(cat "${TUS_RUN_DIR_FILE}")"
    echo "restart ${SLURM_RESTART_COUNT:-0} of job ${SLURM_JOB_ID:-}: resuming ${TUS_RESUME}"
fi
echo "partition=${SLURM_JOB_PARTITION:-default} account=${SLURM_JOB_ACCOUNT:-default} gpus=${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-none}} cpus/task=${CPUS}"
