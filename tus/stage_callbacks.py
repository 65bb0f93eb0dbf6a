"""Callbacks each fine-tuning run gets from its config (kept apart from the CV loop).

- ``record_losses: true`` -> :class:`PerSampleLossRecorder` writing ``<run>/losses.csv``
  (the input of ``tus noisy-labels``);
- ``gradcam.enabled: true`` -> :class:`GradCAMPlusPlusLogger` writing ``<run>/gradcam/``,
  with the markers of ``data.augment.markers``.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback

from tus.callbacks.gradcam import GradCAMPlusPlusLogger
from tus.callbacks.loss_recorder import PerSampleLossRecorder


def finetune_callbacks(config, run_info: dict, run_dir: Path) -> list[Callback]:
    callbacks: list[Callback] = []
    if config.record_losses:
        callbacks.append(PerSampleLossRecorder(Path(run_dir) / "losses.csv", run_info))
    if config.gradcam.enabled:
        callbacks.append(GradCAMPlusPlusLogger.from_config(config.gradcam, Path(run_dir) / "gradcam", config.data.augment.markers))
    return callbacks
