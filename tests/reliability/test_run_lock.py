"""Two writers on one run dir: the second is refused with a message naming the holder's pid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_labeled_dataset
from tests.reliability.faults import REPO
from tus.cli.main import main
from tus.config import load_config, save_config
from tus.runs import RunDirError, RunLock
from tus.stages.finetune_cv import FineTuneCVConfig

HOLD = "import sys, time; from pathlib import Path; from tus.runs import RunLock; RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(120)"


@pytest.fixture
def holder(tmp_path: Path):
    """A second process holding ``run.lock`` in ``tmp_path/run`` until the test ends."""
    folder = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield folder, process
    process.kill()
    process.wait()


def test_second_writer_is_refused_naming_the_holder(holder):
    folder, process = holder
    pid = process.pid
    with pytest.raises(RunDirError, match=rf"in use by another tus process \(pid {pid}\)"):
        RunLock(folder).acquire()
    assert (folder / "run.lock").read_text() == str(pid)  # the refused writer leaves the lock alone


def test_a_lock_left_by_a_killed_process_is_taken_over(holder):
    folder, process = holder
    process.kill()
    process.wait()
    with RunLock(folder) as lock:
        assert lock.held and (folder / "run.lock").read_text() != str(process.pid)
    assert not (folder / "run.lock").exists()


def test_cli_resume_of_a_locked_run_dir_is_refused(holder, tmp_path: Path, capsys):
    folder, process = holder
    pid = process.pid
    manifest = make_labeled_dataset(tmp_path / "data", patients=12)
    config = load_config(FineTuneCVConfig, "finetune/cpu", [f"data.manifest={manifest}", "logging.wandb=false", "data.cache_images=false"])
    save_config(config, folder / "config.yaml")
    code = main(["finetune-cv", "--run-dir", str(folder)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(error) == 1 and f"pid {pid}" in error[0] and str(folder) in error[0]
    assert not (folder / "folds.csv").exists()  # nothing was written by the refused process
