"""Fault injection for the training stages: run ``tus <stage>`` as a subprocess, SIGKILL (or
SIGTERM) it at a random moment after its first checkpoint, and read back what the run dirs hold."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120


def tus_command(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "tus.cli", stage, *args]


def _env() -> dict[str, str]:
    # One thread per process: the suite's machines are small, and thread counts must not
    # change the floating-point reductions between the compared runs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def start(stage: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(tus_command(stage, *args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after_first_checkpoint(process: subprocess.Popen, root: Path, rng: random.Random, window_s: float, signum: int = signal.SIGKILL) -> float:
    """Send ``signum`` (SIGKILL by default) to ``process`` ``U(0, window_s)`` seconds after a
    ``checkpoints/last.ckpt`` first appears under ``root``; the delay used. Fails if the process
    ended before the signal."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not any(root.rglob("checkpoints/last.ckpt")):
        assert process.poll() is None, f"the run ended before its first checkpoint:\n{process.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint within the startup timeout"
        time.sleep(0.01)
    delay = rng.uniform(0.0, window_s)
    time.sleep(delay)
    assert process.poll() is None, "the run finished before the kill: lengthen it or shorten the window"
    process.send_signal(signum)
    process.wait(timeout=STARTUP_TIMEOUT_S)
    return delay


def only_run_dir(root: Path) -> Path:
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit-identical safetensors files (every tensor equal, same names)."""
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert tensor.dtype == second[name].dtype and tensor.equal(second[name]), f"{a.name}: {name} differs"


def assert_no_duplicated_steps(path: Path) -> pd.DataFrame:
    """A metrics.csv whose rows never repeat a step with the same columns filled (what a killed
    attempt's rows left in front of the resumed attempt's would do); returns the table."""
    table = pd.read_csv(path)
    filled = table.notna().apply(lambda row: tuple(table.columns[row.to_numpy()]), axis=1)
    keys = pd.DataFrame({"step": table["step"], "filled": filled})
    assert not keys.duplicated().any(), f"{path}: duplicated rows\n{table[keys.duplicated(keep=False)]}"
    return table


def assert_same_log(resumed: Path, straight: Path) -> None:
    """The resumed run's CSV log holds exactly the uninterrupted run's rows, value for value.

    For losses.csv (a weighted sampler draws a sample several times in a step, so rows may
    repeat) this equality is the no-duplicates check: the uninterrupted run has no killed attempt.
    """
    a, b = pd.read_csv(resumed), pd.read_csv(straight)
    assert sorted(a.columns) == sorted(b.columns)
    order = sorted(a.columns)
    a = a[order].sort_values(order, kind="stable", na_position="first").reset_index(drop=True)
    b = b[order].sort_values(order, kind="stable", na_position="first").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def tus_in_process(stage: str, *args: str) -> None:
    """Run ``tus <stage>`` in this process (no second interpreter start on a small machine)."""
    import torch

    from tus.cli.main import main

    # The subprocesses run on one thread (_env); a twin on more threads reduces in another order.
    assert torch.get_num_threads() == 1, f"the in-process twin would run on {torch.get_num_threads()} torch threads"
    assert main([stage, "--debug", *args]) == 0


class Killer:
    """Kills a stage subprocess from a thread while this process runs the uninterrupted twin."""

    def __init__(self, process: subprocess.Popen, root: Path, rng: random.Random, window_s: float, signum: int = signal.SIGKILL):
        import threading

        self.delay: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._kill, args=(process, root, rng, window_s, signum), daemon=True)
        self._thread.start()

    def _kill(self, *args) -> None:
        try:
            self.delay = kill_after_first_checkpoint(*args)
        except BaseException as error:  # re-raised in join(), on the test's thread
            self.error = error

    def join(self) -> float:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.delay
