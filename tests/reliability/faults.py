"""Fault injection for the training stages: run ``tus <stage>`` as a subprocess, SIGKILL (or
SIGTERM) it at a random moment after its first checkpoint, and read back what the run dirs hold.

:func:`interrupted_beside_twin` runs one SIGKILLed and one SIGTERMed attempt of a stage while this
process runs their uninterrupted twin: both faults are compared with one reference run (a
stage's whole fault test costs three runs, not four, and one interpreter start less)."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from tus.callbacks.checkpoint import partial_path

REPO = Path(__file__).resolve().parents[2]
# A loaded 2-core machine (xdist's other worker, the twin in this process) took over 120 s to
# start a stage and write its first checkpoint.
STARTUP_TIMEOUT_S = 300
# How often the killer looks for the first checkpoint: it runs beside the in-process twin, and a
# tree walk every 10 ms took the twin's interpreter lock noticeably often.
POLL_S = 0.05


def tus_command(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "tus.cli", stage, *args]


def _env() -> dict[str, str]:
    # One thread per process: the suite's machines are small, and thread counts must not
    # change the floating-point reductions between the compared runs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def start(stage: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(tus_command(stage, *args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def checkpoint_written(root: Path) -> bool:
    """Whether a ``checkpoints/last.ckpt`` is under ``root`` yet."""
    try:
        return any(root.rglob("checkpoints/last.ckpt"))
    except FileNotFoundError:  # a stage checks that it can write there by making and removing folders
        return False


def kill_after_first_checkpoint(process: subprocess.Popen, root: Path, rng: random.Random, window_s: float, signum: int = signal.SIGKILL) -> float:
    """Send ``signum`` (SIGKILL by default) to ``process`` ``U(0, window_s)`` seconds after a
    ``checkpoints/last.ckpt`` first appears under ``root``; the delay used. Fails if the process
    ended before the signal."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not checkpoint_written(root):
        assert process.poll() is None, f"the run ended before its first checkpoint:\n{process.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint within the startup timeout"
        time.sleep(POLL_S)
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


@dataclass
class Interrupted:
    """A stage subprocess stopped by ``signum``; ``run_dir`` is the run dir it left."""

    signum: int
    process: subprocess.Popen
    run_dir: Path


def interrupted_beside_twin(stage: str, overrides: Callable[[Path], list[str]], root: Path, seeds: dict[int, int], window_s: float | dict[int, float] = 1.0) -> tuple[list[Interrupted], Path]:
    """Start ``tus <stage> *overrides(root / <signal name>)`` once per signal in ``seeds`` and send
    it that signal U(0, ``window_s``) s (drawn from ``random.Random(seed)``; ``window_s`` may be
    given per signal) after its first checkpoint, while this process runs the uninterrupted twin
    into ``root / "straight"``. Returns the stopped attempts, in the order of ``seeds``, and the
    twin's run dir."""
    windows = window_s if isinstance(window_s, dict) else dict.fromkeys(seeds, window_s)
    started: list[tuple[int, subprocess.Popen, Path, Killer]] = []
    try:
        for signum, seed in seeds.items():
            out = root / signal.Signals(signum).name.lower()
            process = start(stage, *overrides(out))
            started.append((signum, process, out, Killer(process, out, random.Random(seed), windows[signum], signum)))
        tus_in_process(stage, *overrides(root / "straight"))
        for _, _, _, killer in started:
            killer.join()
    finally:
        for _, process, _, _ in started:  # a failed twin or kill leaves no process behind
            if process.poll() is None:
                process.kill()
                process.wait()
    return [Interrupted(signum, process, only_run_dir(out)) for signum, process, out, _ in started], only_run_dir(root / "straight")


def stopped(process: subprocess.Popen, stage: str, run_dir: Path) -> tuple[re.Match, list[str]]:
    """Exit 143 and exactly one 'stopped by SIGTERM' line; the line's parts and its resume argv."""
    output = process.stdout.read()
    assert process.returncode == 128 + signal.SIGTERM == 143, output[-3000:]
    lines = [line for line in output.splitlines() if "stopped by" in line]
    assert len(lines) == 1, output[-3000:]
    match = re.fullmatch(rf"tus {stage}: stopped by SIGTERM \((checkpoint saved at step (\d+)|its last checkpoint \(if any\) is kept)\); resume with: (.+)", lines[0])
    assert match, lines[0]
    command = shlex.split(match.group(3))
    assert command == ["tus", stage, "--resume", str(run_dir.resolve())]
    assert "Traceback" not in output
    return match, command[2:]


def saved_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


def leave_partial_write(run_dir: Path, pid: int) -> Path:
    """The temp file a SIGKILL in the middle of a checkpoint write by process ``pid`` leaves (the
    kill lands mid-write only by chance: the test makes sure it is there)."""
    partial = partial_path(run_dir / "checkpoints" / "last.ckpt", pid)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"half a checkpoint")
    return partial


def partial_writes(root: Path) -> list[Path]:
    return sorted(root.rglob("checkpoints/.*.partial-*"))
