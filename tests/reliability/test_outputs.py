"""Where outputs go (issue 23): an output root or ``--out`` that cannot be written is refused in
one line naming the option, before any data are read or features computed; two processes
writing one ``--out`` are refused; a corrupt pool image is found before the run dir exists."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.bad_inputs.test_bad_inputs import hash_tree
from tests.helpers import make_labeled_dataset
from tus.cli.main import main
from tus.data.images import UsageError
from tus.data.outputs import claim_output
from tus.data.phantom import generate_phantom


def one_error_line(capsys) -> str:
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("stage", ["finetune-cv", "pretrain", "diffusion"])
@pytest.mark.parametrize(("root", "words"), [("{file}", "is a file, not a folder"), ("/proc/tus-runs", "cannot create a run dir there"), ("{file}/runs", "a path component is a file")])
def test_an_output_root_that_cannot_hold_run_dirs_is_refused_before_the_data_are_read(tmp_path: Path, capsys, stage: str, root: str, words: str):
    (tmp_path / "file").write_text("not a folder")
    root = root.format(file=tmp_path / "file")
    # The data do not exist: the output root is what is checked first.
    data = {"finetune-cv": ["--config", "finetune/cpu", "--data.manifest=/nowhere/manifest.csv"], "pretrain": ["--config", "pretrain/cpu"], "diffusion": ["--config", "diffusion/cpu"]}[stage]
    if stage != "finetune-cv":
        data.append("--data.sources=[{manifest: /nowhere/pool.csv}]")
    code = main([stage, *data, f"--output_root={root}"])
    line = one_error_line(capsys)
    assert code == 1 and f"output_root {root}: " in line and words in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_phantom_onto_an_existing_dataset_is_refused_and_nothing_changes(tmp_path: Path, capsys):
    generate_phantom(tmp_path / "phantom", num_patients=3, pool_size=2, image_size=32, seed=0)
    before = hash_tree(tmp_path / "phantom")
    code = main(["data", "phantom", "--out", str(tmp_path / "phantom"), "--patients", "5", "--seed", "1", "--image-size", "32"])
    line = one_error_line(capsys)
    assert code == 2 and "--out" in line and "not empty" in line
    assert hash_tree(tmp_path / "phantom") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom"]  # no staging or lock file left


def test_phantom_into_an_empty_folder_is_written_and_nothing_is_left_beside_it(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    paths = generate_phantom(tmp_path / "empty", num_patients=2, pool_size=2, image_size=32)
    assert paths.labeled_manifest.is_file() and paths.unlabeled_manifest.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.fixture
def labeled(tmp_path: Path) -> Path:
    return make_labeled_dataset(tmp_path / "data", patients=4, per_patient=1)


@pytest.mark.parametrize("command", ["crop", "filter", "metrics", "noisy-labels", "phantom"])
def test_a_second_writer_of_the_same_out_is_refused(tmp_path: Path, labeled: Path, capsys, command: str):
    out = tmp_path / ("metrics.json" if command == "metrics" else "out")
    argv = {
        "crop": ["data", "crop", str(labeled), "--out", str(out)],
        "filter": ["filter", "--real", str(labeled), "--generated", str(labeled.parent / "images"), "--out", str(out), "--k", "1"],
        "metrics": ["metrics", "--real", str(labeled), "--generated", str(labeled.parent / "images"), "--out", str(out)],
        "noisy-labels": ["noisy-labels", str(tmp_path / "a_cv_run"), "--manifest", str(labeled), "--out", str(out)],
        "phantom": ["data", "phantom", "--out", str(out), "--patients", "2"],
    }[command]
    before = hash_tree(labeled.parent)
    with claim_output(out, "--out", folder=command != "metrics"):  # the other process, mid-write
        code = main(argv)
    line = one_error_line(capsys)
    assert code == 2 and f"--out {out}: another tus process is writing there" in line, line
    assert not out.exists() and hash_tree(labeled.parent) == before


def test_the_lock_is_released_when_the_command_fails(tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), claim_output(out):
        raise RuntimeError("the command failed")
    with claim_output(out):  # free again
        pass
    assert not any(tmp_path.iterdir())


def test_an_out_that_became_occupied_while_waiting_is_refused(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("someone else's result")
    with pytest.raises(UsageError, match="not empty"), claim_output(out):
        pass


def test_read_only_file_systems_are_named_in_one_line(tmp_path: Path, capsys):
    """A real read-only mount where this runs as root; skipped elsewhere."""
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        assert main(["data", "phantom", "--out", str(mount / "phantom"), "--patients", "2"]) == 1
        assert "read-only file system" in one_error_line(capsys)
        assert main(["finetune-cv", "--config", "finetune/cpu", f"--output_root={mount / 'runs'}", "--data.manifest=/nowhere.csv"]) == 1
        assert f"output_root {mount / 'runs'}: cannot create a run dir there: read-only file system" in one_error_line(capsys)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_corrupt_pool_image_is_refused_before_a_run_dir_exists(tmp_path: Path, capsys):
    pool = generate_phantom(tmp_path / "phantom", num_patients=2, pool_size=12, image_size=32).unlabeled_manifest
    broken = sorted((pool.parent / "images").iterdir())[3]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    code = main(["pretrain", "--config", "pretrain/cpu", f"--data.sources=[{{manifest: {pool}}}]", f"--output_root={tmp_path / 'runs'}", "--logging.wandb=false"])
    line = one_error_line(capsys)
    assert code == 1 and broken.name in line
    assert not (tmp_path / "runs").exists()
    shutil.rmtree(tmp_path / "phantom")
