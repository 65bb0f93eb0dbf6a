"""Messages that blame the right thing (issue 23): a folder, FIFO or device given as an image is
named as what it is (not "not found"); `crop --max-views 0` blames the option, not an image; a
missing `base:` config names the file that named it; an out-of-range seed names `seeds`."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from tus.cli.main import main as tus_main
from tus.config import ConfigError, load_yaml
from tus.data.images import ImageReadError, read_grayscale
from tus.data.manifest import check_manifest


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_folder_fifo_and_device_are_named_as_such(labeled_manifest: Path, tmp_path: Path):
    folder = tmp_path / "a_folder.png"
    folder.mkdir()
    fifo = tmp_path / "a_pipe.png"
    os.mkfifo(fifo)  # reading it would block: the check must not open it
    cases = {folder: "is a folder, not an image file", fifo: "is a FIFO (named pipe), not an image file", Path("/dev/null"): "is a character device, not an image file"}
    for path, said in cases.items():
        with pytest.raises(ImageReadError) as error:
            read_grayscale(path)
        assert str(error.value) == f"{path}: {said}"
    frame = pd.read_csv(labeled_manifest, dtype=str)
    frame.loc[:2, "path"] = [str(p) for p in cases]
    frame.to_csv(labeled_manifest, index=False)
    _, problems = check_manifest(labeled_manifest)
    messages = [str(p) for p in problems if "not an image file" in str(p)]
    assert [m.split(": ", 1)[1] for m in messages] == [f"{p} {said}" for p, said in cases.items()]
    assert all(f"line {line}" in m for line, m in zip((2, 3, 4), messages))
    assert not any("not found" in str(p) for p in problems)


def test_crop_max_views_zero_blames_the_option(labeled_manifest: Path, tmp_path: Path, capsys):
    out = tmp_path / "crops"
    assert tus_main(["data", "crop", str(labeled_manifest), "--out", str(out), "--max-views", "0"]) == 2
    line = one_error_line(capsys)
    assert "--max-views must be >= 1" in line and "got 0" in line
    assert not out.exists()


def test_missing_base_names_the_file_that_named_it(tmp_path: Path):
    child = tmp_path / "child.yaml"
    child.write_text("base: ../nowhere/parent.yaml\nseeds: [0]\n")
    with pytest.raises(ConfigError) as error:
        load_yaml(child)
    message = str(error.value)
    assert message.startswith(f"{child}: its 'base: ../nowhere/parent.yaml'")
    assert str(tmp_path / "../nowhere/parent.yaml") in message and "\n" not in message


@pytest.mark.parametrize("override, key", [("--seeds=[0,4294967296]", "seeds"), ("--data.fold_seed=-1", "data.fold_seed")])
def test_out_of_range_seed_names_its_key(override: str, key: str, capsys):
    assert tus_main(["finetune-cv", "--config", "finetune/cpu", override, "--print_config"]) == 2
    line = one_error_line(capsys)
    assert f"{key}: seed(s)" in line and "0 .. 4294967295" in line
