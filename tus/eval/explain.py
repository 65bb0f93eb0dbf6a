"""Grad-CAM++ explanations and marker sensitivity, measured (TesticulUS Fig. 5 / thesis Fig. 6.1).

For a classifier and a set of images this computes, with and without synthetic markers
burned in:

- ``prediction_change_rate``: the fraction of images whose predicted class changes when
  markers are added;
- ``mean_probability_shift``: the mean absolute change of the positive-class probability;
- ``cam_mass_on_markers_marked``: the share of each marked image's Grad-CAM++ mass that lies
  on its marker pixels, and ``cam_mass_on_markers_clean``: the share of the clean image's
  mass on those same pixels. A marker-sensitive model shows marked >> clean; a
  marker-invariant one shows both close to ``marker_area`` (the pixels' share of the image).

Each CAM explains the class the model predicts for that image (as in the reference's
figures): when markers flip a prediction, the marked CAM shows what the new decision rests on. ``tus explain`` writes overlay grids (image, CAM, image + markers, CAM) and the
numbers for any images; :class:`tus.callbacks.gradcam.GradCAMPlusPlusLogger` logs them
during training.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAMPlusPlus
from pytorch_grad_cam.utils.image import show_cam_on_image
from torch import nn

from tus.data.datasets import resize_square
from tus.data.images import read_grayscale
from tus.data.markers import MarkerConfig, inject_markers_into_batch
from tus.data.transforms import NORMALIZE_MEAN, NORMALIZE_STD, eval_transform

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class TargetLayerError(ValueError):
    """The Grad-CAM target layer does not exist or has no spatial output."""


@contextmanager
def explaining(model: nn.Module) -> Iterator[None]:
    """Let Grad-CAM run anywhere, even inside Lightning's ``inference_mode`` validation.

    Gradients are enabled; parameters stop requiring them (CAMs need gradients of
    activations only), so no parameter ``.grad`` changes and no DDP gradient hook fires;
    existing ``.grad`` tensors (pytorch-grad-cam calls ``zero_grad``) and every module's
    train/eval flag are put back afterwards.
    """
    training = {module: module.training for module in model.modules()}
    parameters = list(model.parameters())
    requires_grad = [p.requires_grad for p in parameters]
    grads = [p.grad for p in parameters]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for parameter in parameters:
                parameter.requires_grad_(False)
            model.eval()
            yield
    finally:
        for parameter, flag, grad in zip(parameters, requires_grad, grads):
            parameter.requires_grad_(flag)
            parameter.grad = grad
        for module, flag in training.items():
            module.training = flag


def find_target_layer(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the last module to finish with a (N, C, H, W) output with H * W > 1.

    Containers finish after their children, so for a timm ResNet inside a classifier this
    is ``backbone.layer4`` (the global pool that follows flattens): the last block of the
    backbone, the usual Grad-CAM layer, found without knowing the architecture.
    """
    finished: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(_record_spatial(name, finished)))
    try:
        with explaining(model), torch.no_grad():
            model(_plain_copy(example[:1], model))
    finally:
        for handle in handles:
            handle.remove()
    if not finished:
        raise TargetLayerError(f"{type(model).__name__} has no module with a spatial (N, C, H, W) output to explain")
    return finished[-1]


def _record_spatial(name: str, finished: list[str]):
    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
            finished.append(name)

    return hook


def resolve_target_layer(model: nn.Module, name: str | None, example: torch.Tensor) -> tuple[str, nn.Module]:
    """The module named ``name`` (dotted, e.g. ``backbone.layer4``), or the automatic choice."""
    name = name or find_target_layer(model, example)
    try:
        return name, model.get_submodule(name)
    except AttributeError as error:
        children = ", ".join(n for n, _ in model.named_children())
        raise TargetLayerError(f"no module '{name}' in {type(model).__name__} (top-level modules: {children})") from error


def _plain_copy(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    # A clone made outside inference mode is an ordinary tensor autograd can use.
    parameter = next(model.parameters())
    with torch.inference_mode(False):
        return images.detach().clone().to(parameter.device, parameter.dtype)


def gradcam_plus_plus(model: nn.Module, images: torch.Tensor, target_layer: nn.Module) -> tuple[np.ndarray, torch.Tensor]:
    """Grad-CAM++ maps (N, H, W) in [0, 1] of each image's predicted class, and the logits.

    The model's state is left as found (see :func:`explaining`) and the hooks that
    pytorch-grad-cam registers are removed before returning, also on errors.
    """
    with explaining(model):
        inputs = _plain_copy(images, model)
        cam = GradCAMPlusPlus(model=model, target_layers=[target_layer])
        try:
            # Inputs must require grad: parameters don't, and the CAM needs activations' gradients.
            cam.compute_input_gradient = True
            maps = cam(inputs, targets=None)  # None: the predicted class of each image
            logits = cam.outputs.detach().float().cpu()
        finally:
            cam.activations_and_grads.release()
    return maps, logits


def cam_mass_share(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, the share of CAM mass on the mask's pixels (NaN for an all-zero CAM)."""
    masks = masks.reshape(cams.shape).astype(bool)
    total = cams.reshape(len(cams), -1).sum(1)
    on_mask = (cams * masks).reshape(len(cams), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, on_mask / total, np.nan)


@dataclass
class MarkerSensitivity:
    """Clean vs marked images, their CAMs and predictions; :meth:`summary` gives the numbers."""

    images: torch.Tensor  # (N, 1, H, W), normalised
    marked: torch.Tensor
    masks: np.ndarray  # (N, H, W) bool, True on marker pixels
    cams_clean: np.ndarray  # (N, H, W) in [0, 1]
    cams_marked: np.ndarray
    probabilities_clean: np.ndarray  # (N,) positive-class probability
    probabilities_marked: np.ndarray
    predicted_clean: np.ndarray  # (N,) class index
    predicted_marked: np.ndarray
    target_layer: str

    @property
    def mass_clean(self) -> np.ndarray:
        return cam_mass_share(self.cams_clean, self.masks)

    @property
    def mass_marked(self) -> np.ndarray:
        return cam_mass_share(self.cams_marked, self.masks)

    def summary(self) -> dict:
        return {
            "num_images": int(len(self.images)),
            "target_layer": self.target_layer,
            "prediction_change_rate": float((self.predicted_clean != self.predicted_marked).mean()),
            "mean_probability_shift": float(np.abs(self.probabilities_marked - self.probabilities_clean).mean()),
            "cam_mass_on_markers_clean": _nanmean(self.mass_clean),
            "cam_mass_on_markers_marked": _nanmean(self.mass_marked),
            "marker_area": float(self.masks.reshape(len(self.masks), -1).mean(1).mean()),
        }

    def rows(self, rows: slice) -> MarkerSensitivity:
        return MarkerSensitivity(**{f.name: _take(getattr(self, f.name), rows) for f in fields(self)})

    @staticmethod
    def concatenate(parts: list[MarkerSensitivity]) -> MarkerSensitivity:
        return MarkerSensitivity(**{f.name: _join([getattr(p, f.name) for p in parts]) for f in fields(MarkerSensitivity)})

    def per_image(self, names: list[str]) -> pd.DataFrame:
        return pd.DataFrame({
            "image": names,
            "probability_clean": self.probabilities_clean,
            "probability_marked": self.probabilities_marked,
            "predicted_clean": self.predicted_clean,
            "predicted_marked": self.predicted_marked,
            "marker_area": self.masks.reshape(len(self.masks), -1).mean(1),
            "cam_mass_on_markers_clean": self.mass_clean,
            "cam_mass_on_markers_marked": self.mass_marked,
        })


def _take(value, rows: slice):
    return value if isinstance(value, str) else value[rows]


def _join(values: list):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    return values[0] if isinstance(values[0], str) else np.concatenate(values)


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def add_markers(images: torch.Tensor, rng: np.random.Generator, config: MarkerConfig | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Markers burned into every image of a normalised batch; masks as (N, H, W) bool."""
    marked, masks = inject_markers_into_batch(images, rng, config or MarkerConfig(), NORMALIZE_MEAN, NORMALIZE_STD)
    return marked, masks[:, 0].cpu().numpy()


def measure_marker_sensitivity(
    model: nn.Module, images: torch.Tensor, marked: torch.Tensor, masks: np.ndarray, target_layer: str | None = None
) -> MarkerSensitivity:
    """Grad-CAM++ of clean and marked images, each explaining the class predicted for it."""
    name, layer = resolve_target_layer(model, target_layer, images)
    cams_clean, logits_clean = gradcam_plus_plus(model, images, layer)
    cams_marked, logits_marked = gradcam_plus_plus(model, marked, layer)
    return MarkerSensitivity(
        images=images.detach().cpu(),
        marked=marked.detach().cpu(),
        masks=np.asarray(masks, dtype=bool),
        cams_clean=cams_clean,
        cams_marked=cams_marked,
        probabilities_clean=logits_clean.softmax(1)[:, -1].numpy(),
        probabilities_marked=logits_marked.softmax(1)[:, -1].numpy(),
        predicted_clean=logits_clean.argmax(1).numpy(),
        predicted_marked=logits_marked.argmax(1).numpy(),
        target_layer=name,
    )


def _display(image: torch.Tensor) -> np.ndarray:
    """A normalised (1, H, W) image as float RGB in [0, 1] for overlays."""
    gray = (image[0].float().numpy() * NORMALIZE_STD + NORMALIZE_MEAN).clip(0, 1)
    return np.repeat(gray[..., None], 3, axis=2).astype(np.float32)


def save_overlay_grid(result: MarkerSensitivity, names: list[str], path: str | Path) -> Path:
    """One row per image: image, its Grad-CAM++, image + markers, its Grad-CAM++."""
    rows = len(names)
    figure = Figure(figsize=(10, 2.6 * rows), layout="constrained")
    axes = figure.subplots(rows, 4, squeeze=False)
    mass_clean, mass_marked = result.mass_clean, result.mass_marked
    for row, name in enumerate(names):
        clean, marked = _display(result.images[row]), _display(result.marked[row])
        panels = [
            # The file name only: full paths overflow into the neighbouring panel's title.
            (clean, f"{Path(name).name}\np(pos)={result.probabilities_clean[row]:.2f}"),
            (show_cam_on_image(clean, result.cams_clean[row], use_rgb=True), f"Grad-CAM++ clean\nmass on marker px {mass_clean[row]:.0%}"),
            (marked, f"+ markers\np(pos)={result.probabilities_marked[row]:.2f}"),
            (show_cam_on_image(marked, result.cams_marked[row], use_rgb=True), f"Grad-CAM++ marked\nmass on marker px {mass_marked[row]:.0%}"),
        ]
        for axis, (image, title) in zip(axes[row], panels):
            axis.imshow(image)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def format_summary(summary: dict) -> str:
    return "\n".join([
        f"images: {summary['num_images']}  (Grad-CAM++ layer: {summary['target_layer']})",
        f"predictions changed by markers: {summary['prediction_change_rate']:.1%}",
        f"mean |p(pos) shift|: {summary['mean_probability_shift']:.3f}",
        f"CAM mass on marker pixels: clean {summary['cam_mass_on_markers_clean']:.1%} -> marked {summary['cam_mass_on_markers_marked']:.1%}"
        f" (marker pixels cover {summary['marker_area']:.1%} of the image)",
    ])






def load_images(paths: list[Path], image_size: int) -> torch.Tensor:
    transform = eval_transform()
    return torch.stack([transform(resize_square(read_grayscale(p), image_size)) for p in paths])


