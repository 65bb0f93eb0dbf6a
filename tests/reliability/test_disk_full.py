"""A full disk while a resume checkpoint is written (issue 23): the run ends in one line naming
the file and the cause (exit 1), the previous checkpoint stays loadable, and a resume continues
from it to the end. A checkpoint that does not load is set aside and the previous one is used."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from tests.methods.test_iddpm import disk_manifest
from tests.reliability.test_diffusion_fault import overrides
from tus.callbacks import checkpoint as checkpoint_module
from tus.cli.main import main
from tus.models.weights import load_weights


def _fail_on_save(monkeypatch, failing_call: int) -> list[int]:
    """torch.save in the checkpoint writer writes half a file, then the disk is full, on call ``failing_call``."""
    calls: list[int] = []
    real_save = torch.save

    def save(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == failing_call:
            handle.write(b"PK\x03\x04" + b"\x00" * 1000)  # the start of a zip, then nothing
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    return calls


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resume_continues(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    manifest = disk_manifest(tmp_path / "data")
    args = [*overrides(manifest, tmp_path / "runs"), "--trainer.max_steps=12"]
    _fail_on_save(monkeypatch, failing_call=3)  # checkpoints at steps 3, 6, then 9 fails

    code = main(["diffusion", *args])

    printed = capsys.readouterr()
    lines = [line for line in printed.err.splitlines() if line.strip()]
    assert code == 1, printed
    assert "Traceback" not in printed.err + printed.out
    assert lines[-1].startswith("tus diffusion: error: ") and "last.ckpt" in lines[-1] and "no space left on device" in lines[-1], lines
    (run_dir,) = (tmp_path / "runs").iterdir()
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "last.prev.ckpt"]  # no partial file left
    assert load_weights(folder / "last.ckpt")["global_step"] == 6
    assert load_weights(folder / "last.prev.ckpt")["global_step"] == 3

    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["diffusion", "--resume", str(run_dir)]) == 0
    (exported,) = (run_dir / "export").iterdir()
    assert exported.name == "ema_unet_step0000012"
    assert load_weights(folder / "last.ckpt")["global_step"] == 12


def test_a_checkpoint_that_does_not_load_is_set_aside_and_the_previous_one_is_used(tmp_path: Path, capsys):
    from tus.runs import resume_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, folder / "last.prev.ckpt")
    good = (folder / "last.prev.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(good[: len(good) // 2])  # truncated, as a copy across file systems left it

    assert resume_checkpoint(tmp_path) == folder / "last.prev.ckpt"

    warning = capsys.readouterr().err
    (aside,) = folder.glob("last.ckpt.corrupt-*")
    assert aside.read_bytes() == good[: len(good) // 2]  # kept for inspection, not deleted
    assert "last.ckpt does not load" in warning and aside.name in warning and "resuming from last.prev.ckpt" in warning
    assert not (folder / "last.ckpt").exists()


def test_without_any_loadable_checkpoint_the_run_starts_over(tmp_path: Path, capsys):
    from tus.runs import resume_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    assert resume_checkpoint(tmp_path) is None
    assert "starting this run over" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["torch-zip", "pickle"])
def test_a_pickle_last_ckpt_is_refused_in_one_line_and_no_code_runs(tmp_path: Path, form: str, capsys, monkeypatch):
    from tests.bad_inputs.test_bad_inputs import MARKER, write_payload

    monkeypatch.setenv("WANDB_MODE", "disabled")
    manifest = disk_manifest(tmp_path / "data")
    args = [*overrides(manifest, tmp_path / "runs"), "--trainer.max_steps=3"]
    assert main(["diffusion", *args]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    marker = tmp_path / MARKER
    write_payload(run_dir / "checkpoints" / "last.ckpt", marker, form)
    capsys.readouterr()

    code = main(["diffusion", "--resume", str(run_dir), "--trainer.max_steps=6", "--allow-config-change"])

    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, printed
    assert "last.ckpt" in lines[0] and "refused" in lines[0] and "weights_only=False" not in lines[0]
    assert not marker.exists(), "a pickle payload ran"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # refused, not set aside as corrupt


def test_checkpoints_are_written_atomically_and_the_previous_one_is_kept_as_a_link(tmp_path: Path, monkeypatch):
    from tus.callbacks.checkpoint import SafeCheckpointIO

    io_ = SafeCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io_.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    io_.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert io_.load_checkpoint(path)["global_step"] == 2
    assert io_.load_checkpoint(tmp_path / "checkpoints" / "last.prev.ckpt")["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.prev.ckpt"]
    # A file system without hard links: no previous copy, the checkpoint is still replaced whole.
    monkeypatch.setattr(checkpoint_module.os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "Operation not permitted")))
    io_.save_checkpoint({"global_step": 3, "w": torch.ones(3)}, path)
    assert io_.load_checkpoint(path)["global_step"] == 3
    assert io_.load_checkpoint(tmp_path / "checkpoints" / "last.prev.ckpt")["global_step"] == 1
