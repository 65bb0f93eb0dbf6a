"""What `make` runs (dry run, `make -n`): the CPU fine-tuning recipe unless RECIPE asks for
another, and `make table SHRINK=1` on the phantom set without any study variable set (issue 23)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(*args: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TUS_")}
    done = subprocess.run(["make", "-n", *args, "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True, text=True, check=True, env={**clean, **env}, timeout=60)
    return done.stdout


def tus_line(output: str, command: str) -> str:
    lines = [line for line in output.splitlines() if f"/bin/tus {command}" in line]
    assert len(lines) == 1, output
    return lines[0]


def test_finetune_on_user_data_keeps_the_cpu_recipe():
    line = tus_line(dry_run("finetune", "DATA=my.csv"), "finetune-cv")
    assert "--config finetune/cpu " in line and "--data.manifest=my.csv" in line


def test_finetune_recipe_paper_is_asked_for():
    assert "--config finetune/paper " in tus_line(dry_run("finetune", "DATA=my.csv", "RECIPE=paper"), "finetune-cv")


def test_finetune_from_an_encoder():
    line = tus_line(dry_run("finetune", "ENCODER=runs/x/encoder"), "finetune-cv")
    assert "--config finetune/cpu_pretrained --model.weights=runs/x/encoder" in line


def test_shrunk_table_runs_on_the_phantom_without_variables():
    output = dry_run("table", "STUDY=tab4", "SHRINK=1")
    assert "tus data phantom --out data/phantom" in output  # generated first
    line = tus_line(output, "experiment run")
    assert "--shrink" in line
    assert "--set TUS_LABELED=data/phantom/labeled/manifest.csv" in line
    assert "--set TUS_POOL=data/phantom/unlabeled/manifest.csv" in line


def test_shrunk_table_keeps_variables_the_user_set():
    line = tus_line(dry_run("table", "STUDY=tab4", "SHRINK=1", TUS_POOL="my_pool.csv"), "experiment run")
    assert "--set TUS_POOL=my_pool.csv" in line and "TUS_POOL=data/phantom" not in line


def test_full_table_sets_no_phantom_defaults():
    line = tus_line(dry_run("table", "STUDY=tab4"), "experiment run")
    assert "--set" not in line and "--shrink" not in line
