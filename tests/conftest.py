"""Shared fixtures: tiny on-disk datasets, the real-data folder, offline W&B."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.helpers import make_labeled_dataset

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# Decoded-image caches of the suite go to a throw-away folder, never the user's ~/.cache.
os.environ["TUS_CACHE_DIR"] = tempfile.mkdtemp(prefix="tus-test-cache-")
# Figures as PNG only: their PDFs' font subsetting took ~0.5 s each, 69 s of the study runner's
# 417 s test. The figure tests ask for PDFs too (tests/test_figures.py, the guidance plot).
os.environ["TUS_FIGURE_FORMATS"] = "png"

# Test models are tiny and pytest-xdist runs one worker per core: more torch threads than
# free cores make OpenMP threads spin against each other (~5x slower on a 2-core machine).
torch.set_num_threads(1)
# The same for the processes tests launch (the tus command line, benchmark scripts): they inherit
# the environment, and torch would otherwise start one OpenMP thread per core in each of them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts and ends on one torch thread. Why: a benchmark's main() run in
    process sets the thread count for the rest of its xdist worker, and the fault tests compare
    a one-thread subprocess with an in-process twin bit for bit (a 2-thread twin differed in
    the last bits of the weights: CI, stop 29)."""
    omp = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
    # Lightning's DDP launchers pin OMP_NUM_THREADS in os.environ the first time they run (to
    # cores // processes) and every later DDP run in the worker inherits it: restore it.
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding a ``slow`` test first, the rest by their number of tests (most first); a
    file's tests keep their order. Why: ``make test`` hands whole files to 2 xdist workers in
    this order (``--dist loadfile --no-loadscope-reorder``); xdist's own order (most tests first)
    put the one-test files, the 2-4 minute fault tests among them, last, where the one started
    last ran alone while the other worker idled."""
    tests = Counter(item.path for item in items)
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    first = {}
    for index, item in enumerate(items):
        first.setdefault(item.path, index)
    items.sort(key=lambda item: (item.path not in slow, -tests[item.path], first[item.path]))


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the repo; tests using it skip cleanly where it is absent."""
    if not (SHARED_DATA / "busi" / "manifest.csv").is_file():
        pytest.skip(f"real ultrasound data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def labeled_manifest(tmp_path: Path) -> Path:
    return make_labeled_dataset(tmp_path / "labeled")
