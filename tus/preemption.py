"""Stopping on a signal: SIGTERM (``scancel``, a preemption, ``kill``) and SIGUSR1 (what the SLURM
scripts ask for 90 s before the time limit, ``#SBATCH --signal=USR1@90``).

A stopped run exits with ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1: what a shell reports
for a process killed by that signal), never 0, and prints one line saying how to resume. During
training, :class:`tus.callbacks.preemption.StopAtResumablePoint` first trains on to the next point
where the stage resumes exactly, saves ``last.ckpt`` there and stops; outside training (data
checks, testing, writing results) the run stops at once, its last checkpoint untouched. Under
SLURM, SIGUSR1 also requeues the job (``scontrol requeue``): the requeued job resumes the same
run dir (the scripts in ``docker/`` read it from ``TUS_RUN_DIR_FILE``).

This module imports nothing heavy: ``tus`` installs the handlers before it imports a stage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# How long training may go on after a signal to reach a point it resumes exactly from (an epoch
# end for fine-tuning and diffusion); past it the run stops at the next step without saving
# (its previous checkpoint stays). SLURM waits KillWait (30 s by default) between SIGTERM and
# SIGKILL; SIGUSR1 comes 90 s before the time limit in the scripts of docker/.
GRACE_ENV = "TUS_STOP_GRACE_S"
DEFAULT_GRACE_S = {signal.SIGTERM: 20.0, signal.SIGUSR1: 60.0}


class TrainingStopped(SystemExit):
    """A run stopped by a signal; its exit code is ``128 + signum``.

    A SystemExit, like Lightning's own SIGTERMException: ``except Exception`` blocks let it
    through, ``finally`` blocks (run locks, progress bars) still run.
    """

    def __init__(self, signum: int):
        super().__init__(128 + int(signum))
        self.signum = int(signum)


class _State:
    signum: int | None = None
    at: float | None = None
    # True while a Trainer is fitting with StopAtResumablePoint: the handler only records.
    deferred: bool = False
    # The run dir of the last fit (what ``--resume`` takes), set by the callback.
    run_dir: str | None = None
    # The checkpoint saved on the signal, and its step.
    checkpoint: str | None = None
    step: int | None = None


STATE = _State()


def requested() -> int | None:
    """The signal received since :func:`stop_on_signals` started, or None."""
    return STATE.signum


def grace_s(signum: int) -> float:
    value = os.environ.get(GRACE_ENV)
    return float(value) if value else DEFAULT_GRACE_S.get(signal.Signals(signum), 20.0)


def grace_passed() -> bool:
    return STATE.signum is not None and STATE.at is not None and time.monotonic() - STATE.at > grace_s(STATE.signum)


def handle_signal(signum: int, frame: FrameType | None) -> None:
    """Record the first stop signal; outside training, stop now."""
    if STATE.signum is None:
        STATE.signum, STATE.at = int(signum), time.monotonic()
    if not STATE.deferred:
        raise TrainingStopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGUSR1 into :class:`TrainingStopped` for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    STATE.signum, STATE.at, STATE.deferred, STATE.run_dir, STATE.checkpoint, STATE.step = None, None, False, None, None, None
    for s in STOP_SIGNALS:
        signal.signal(s, handle_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        STATE.deferred = False


def is_rank_zero() -> bool:
    """Rank 0 of a job, from the launchers' variables (torchrun, SLURM), without importing torch."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name):
            return os.environ[name] == "0"
    return True


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for an array task, else the job id."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job() -> str | None:
    """``scontrol requeue`` this job (rank 0 of a SLURM job only); a line saying what happened,
    or None outside SLURM."""
    job = slurm_job_id()
    if job is None or not is_rank_zero():
        return None
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"could not requeue SLURM job {job} ({error}); resubmit it"
    if result.returncode != 0:
        return f"could not requeue SLURM job {job} (scontrol: {(result.stderr or result.stdout).strip() or result.returncode}); resubmit it"
    return f"requeued SLURM job {job}: it continues this run when it starts again"


def stop_message(stop: BaseException, command: str, argv: list[str]) -> str:
    """The one line a stopped run prints: what stopped it, what was saved, how to resume."""
    run_dir = STATE.run_dir
    signum = getattr(stop, "signum", None) or STATE.signum or int(signal.SIGTERM)
    name = signal.Signals(signum).name
    if STATE.checkpoint:
        state = f"checkpoint saved at step {STATE.step}"
    elif run_dir:
        state = "its last checkpoint (if any) is kept"
    else:
        state = "stopped before training started"
    resume_flags = {"--resume", "--run-dir", "--join"}
    if any(a.split("=")[0] in resume_flags for a in argv) or command in ("experiment", "demo", "noisy-labels") or not run_dir:
        how = "run the same command again (finished work is kept)"
    else:
        how = f"tus {command} --resume {run_dir}"
    requeued = requeue_slurm_job() if signum == signal.SIGUSR1 else None
    return f"tus {command}: stopped by {name} ({state}); resume with: {how}" + (f"; {requeued}" if requeued else "")
