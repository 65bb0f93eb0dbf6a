"""A signal that arrives outside training: exit 128 + signal with one line.

SIGTERM (``scancel``, a preemption) to a running fine-tuning, pretraining and diffusion (exit
143, one line saying how to resume, a checkpoint from which the printed command resumes to the
result of an uninterrupted run, bit for bit) is tested with SIGKILL, against the same
uninterrupted run, in test_finetune_fault.py, test_pretrain_fault.py and test_diffusion_fault.py.
"""

from __future__ import annotations

import signal

import pytest


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_outside_training_exits_128_plus_signal_with_one_line(monkeypatch, capsys, tmp_path, signum):
    """Before any fit (data checks, planning): stop at once, exit 128 + signal, one line, no traceback;
    the handlers tus installed are gone afterwards. Outside SLURM nothing is requeued."""
    import os

    from tus.cli import main as cli

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    before = signal.getsignal(signum)
    monkeypatch.setitem(cli.STAGES, "pretrain", ("tests.reliability.test_sigterm:_signal_myself", ""))
    global _SIGNAL
    _SIGNAL = signum
    assert cli.main(["pretrain"]) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tus pretrain: stopped by {signal.Signals(signum).name} (stopped before training started); resume with: run the same command again (finished work is kept)"]
    assert signal.getsignal(signum) == before


_SIGNAL = signal.SIGTERM


def _signal_myself(argv: list[str]) -> int:
    import os
    import time

    os.kill(os.getpid(), _SIGNAL)
    time.sleep(5)  # the handler raises before this ends
    return 0
