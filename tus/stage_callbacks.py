"""Callbacks each fine-tuning run gets from its config (kept apart from the CV loop)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback


def finetune_callbacks(config, run_info: dict, run_dir: Path) -> list[Callback]:
    callbacks: list[Callback] = []
    return callbacks
