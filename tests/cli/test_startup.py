"""The command line answers ``--help`` and ``--print_config`` without importing torch or Lightning
(issue 28: `tus --help` and `tus finetune-cv --help` under 1 s), and the written-out
TrainerConfig still matches the installed Lightning's Trainer signature."""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import typing

import pytest

from tus.run_config import TrainerConfig

HEAVY = ("torch", "lightning", "timm", "sklearn", "albumentations", "cv2")

# Runs the command in a fresh interpreter and reports which heavy modules it imported.
PROBE = """
import contextlib, io, json, sys
from tus.cli.main import main
out = io.StringIO()
code = None
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit_:
        code = exit_.code
print(json.dumps({"code": code, "out": out.getvalue(), "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def probe(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["finetune-cv", "--help"],
        ["pretrain", "--help"],
        ["diffusion", "--help"],
        ["sample", "--help"],
        ["metrics", "--help"],
        ["filter", "--help"],
        ["guidance-sweep", "--help"],
        ["explain", "--help"],
        ["experiment", "run", "--help"],
        ["noisy-labels", "--help"],
        ["demo", "--help"],
        ["data", "check", "--help"],
    ],
)
def test_help_imports_no_framework(argv):
    result = probe(*argv)
    assert result["code"] in (0, None)
    assert "usage:" in result["out"]
    assert result["heavy"] == [], f"tus {' '.join(argv)} imported {result['heavy']}"


def test_finetune_print_config_imports_no_framework():
    result = probe("finetune-cv", "--config", "finetune/cpu", "--data.image_size=48", "--print_config")
    assert result["heavy"] == []
    assert "image_size: 48" in result["out"] and "channels_last: auto" in result["out"]


def test_finetune_help_is_fast():
    """Under 1 CPU-second (user + system, of the child process: what a loaded machine does not
    inflate, unlike wall time); importing torch and Lightning alone takes several."""

    def cpu_seconds(*argv: str) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", "tus", *argv], capture_output=True, check=True, timeout=120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    assert min(cpu_seconds("finetune-cv", "--help") for _ in range(2)) < 1.0
    assert min(cpu_seconds("--help") for _ in range(2)) < 1.0


def test_trainer_config_matches_lightning():
    """Every Lightning Trainer argument (name, config type, tus default) is a TrainerConfig field,
    as :func:`tus.runs._trainer_fields` derives them from the installed Lightning."""
    from tus.runs import _trainer_fields

    hints = typing.get_type_hints(TrainerConfig)
    written = {}
    for f in dataclasses.fields(TrainerConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        written[f.name] = (_normalise(hints[f.name]), default)
    derived = {}
    for name, kind, default in _trainer_fields():
        if isinstance(default, dataclasses.Field):
            default = default.default_factory()
        derived[name] = (_normalise(kind), default)
    assert written == derived


def _normalise(kind):
    """X | Y and Union[X, Y] compare equal, member order kept."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, __import__("types").UnionType):
        return ("union", tuple(_normalise(a) for a in args))
    return kind


def test_readme_resume_command_repeats_the_starting_command(tmp_path):
    """The README's resume example (`tus finetune-cv --config finetune/paper --data.manifest=my.csv
    --run-dir RUN`) builds the config the run was started with, so the stage's resume check passes;
    a changed override is still refused naming the key."""
    from tus.cli.common import parse_stage_args
    from tus.config import ConfigError, load_config, save_config
    from tus.runs import check_config_change
    from tus.stages.configs import FineTuneCVConfig

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(FineTuneCVConfig, "finetune/paper", ["--data.manifest=my.csv"]), run_dir / "config.yaml")
    options = {"prog": "tus finetune-cv", "description": "", "default_config": "finetune/paper", "resume_flags": ("--resume", "--run-dir")}

    same = parse_stage_args(FineTuneCVConfig, ["--config", "finetune/paper", "--data.manifest=my.csv", "--run-dir", str(run_dir)], **options)
    assert same is not None and same.resume == run_dir
    check_config_change(run_dir, same.config, allow=False)  # no error: the same config
    assert parse_stage_args(FineTuneCVConfig, ["--run-dir", str(run_dir)], **options).config == same.config

    changed = parse_stage_args(FineTuneCVConfig, ["--config", "finetune/paper", "--data.manifest=other.csv", "--run-dir", str(run_dir)], **options)
    with pytest.raises(ConfigError, match=r"data\.manifest"):
        check_config_change(run_dir, changed.config, allow=False)
