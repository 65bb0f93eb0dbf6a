"""Callback configs that are part of a stage's config, without importing torch or Lightning: the
CLI builds and prints configs from them before any stage loads. :mod:`tus.callbacks.gradcam`
re-exports ``GradCAMConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class GradCAMConfig:
    """Grad-CAM++ logging of a fine-tuning run (``gradcam:`` in a fine-tuning config).

    ``target_layer`` is a dotted module name of the classifier (e.g. ``backbone.layer4``);
    empty picks the backbone's last spatial layer (a ViT's last block ``norm1``). ``method`` is
    ``gradcam++`` or ``scorecam`` (gradient-free; one forward pass per activation channel and image,
    so slower). Markers come from the run's ``data.augment.markers`` config.
    """

    enabled: bool = False
    num_images: int = 8
    target_layer: str = ""
    method: Literal["gradcam++", "scorecam"] = "gradcam++"
    marker_seed: int = 0
    every_n_epochs: int = 1
    on_validation: bool = True
    on_test: bool = True
