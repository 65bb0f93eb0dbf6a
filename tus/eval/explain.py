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
figures): when markers flip a prediction, the marked CAM shows what the new decision rests on.
The CAM is Grad-CAM++ (Chattopadhay et al. 2018) or Score-CAM (Wang et al. 2020, gradient-free:
each activation channel weighted by the model's score on the image masked with it; what USF-MAE
shows), both from pytorch-grad-cam. CNNs are explained at their last spatial layer; a timm ViT at
its last block's ``norm1``, whose (B, 1 + N, C) tokens are reshaped to the (B, C, h, w) patch grid
with the class/register tokens dropped (:func:`tokens_to_grid`), so the numbers work for every
backbone. ``tus explain`` writes overlay grids (image, CAM, image + markers, CAM) and the
numbers for any images; :class:`tus.callbacks.gradcam.GradCAMPlusPlusLogger` logs them
during training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, redirect_stderr
from dataclasses import dataclass, fields
from functools import partial
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tus.data.cache import resize_square
from tus.data.images import read_grayscale
from tus.data.markers import MarkerConfig, inject_markers_into_batch
from tus.data.transforms import NORMALIZE_MEAN, NORMALIZE_STD, eval_transform
from tus.eval.options import CAM_METHODS as CAM_METHODS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Masked copies per Score-CAM forward pass (pytorch-grad-cam's default is 16; larger is faster, costs memory).
SCORECAM_BATCH_SIZE = 64


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

    A timm ViT has no spatial output besides its patch projection; its layer is the last block's
    ``norm1`` (as pytorch-grad-cam's ViT example), whose patch tokens still receive gradients when the
    head reads only the class token (the final ``norm``'s patch tokens would not).
    """
    vits = [(name, module) for name, module in model.named_modules() if isinstance(module, VisionTransformer)]
    if vits:
        name, vit = vits[-1]
        return ".".join(filter(None, [name, "blocks", str(len(vit.blocks) - 1), "norm1"]))
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


def tokens_to_grid(tokens: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """ViT tokens (B, prefix + h * w, C) -> the patch grid (B, C, h, w), prefix (class/register) tokens dropped.

    pytorch-grad-cam's ``reshape_transform``; applied to activations and gradients alike. Anything that is
    not a token sequence (e.g. the patch projection's (B, C, h, w) output) passes unchanged.
    """
    if tokens.ndim != 3:
        return tokens
    height, width = grid_size
    patches = tokens[:, num_prefix_tokens:]
    if patches.shape[1] != height * width:
        raise TargetLayerError(f"{tokens.shape[1]} tokens do not hold {num_prefix_tokens} prefix token(s) + a {height} x {width} patch grid")
    return patches.reshape(len(tokens), height, width, -1).permute(0, 3, 1, 2)


def token_reshape_transform(model: nn.Module, layer_name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The :func:`tokens_to_grid` of the (innermost) timm ViT holding ``layer_name``; None outside ViTs."""
    transform = None
    for name, module in model.named_modules():
        inside = not name or layer_name == name or layer_name.startswith(f"{name}.")
        if isinstance(module, VisionTransformer) and inside:
            grid = tuple(int(side) for side in module.patch_embed.grid_size)
            transform = partial(tokens_to_grid, grid_size=grid, num_prefix_tokens=module.num_prefix_tokens)
    return transform


def _plain_copy(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    # A clone made outside inference mode is an ordinary tensor autograd can use.
    parameter = next(model.parameters())
    with torch.inference_mode(False):
        return images.detach().clone().to(parameter.device, parameter.dtype)


def check_cam_method(method: str) -> str:
    if method not in CAM_METHODS:
        raise ValueError(f"CAM method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    return method


def class_activation_maps(
    model: nn.Module,
    images: torch.Tensor,
    target_layer: nn.Module,
    method: str = "gradcam++",
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target_class: int | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """CAMs (N, H, W) in [0, 1] of each image's predicted class (or of class index ``target_class`` for every
    image) by ``method`` (see :data:`CAM_METHODS`), and the logits. ``reshape_transform`` turns the layer's output into (N, C, h, w) (:func:`token_reshape_transform`).

    The model's state is left as found (see :func:`explaining`) and the hooks that
    pytorch-grad-cam registers are removed before returning, also on errors.
    """
    check_cam_method(method)
    # Imported here: pytorch-grad-cam loads scikit-learn's decomposition and linear models
    # (~0.4 s), which every fine-tuning process would otherwise pay, Grad-CAM on or off.
    from pytorch_grad_cam import GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with explaining(model):
        inputs = _plain_copy(images, model)
        if method == "scorecam":
            cam = ScoreCAM(model=model, target_layers=[target_layer], reshape_transform=reshape_transform)
            cam.batch_size = SCORECAM_BATCH_SIZE
        else:
            cam = GradCAMPlusPlus(model=model, target_layers=[target_layer], reshape_transform=reshape_transform)
            # Inputs must require grad: parameters don't, and the CAM needs activations' gradients.
            cam.compute_input_gradient = True
        try:
            # Score-CAM draws a tqdm bar per image; it would flood training logs.
            with redirect_stderr(StringIO()) if method == "scorecam" else nullcontext():
                # None: the predicted class of each image.
                targets = None if target_class is None else [ClassifierOutputTarget(int(target_class))] * len(inputs)
                maps = cam(inputs, targets=targets)
            logits = cam.outputs.detach().float().cpu()
        finally:
            cam.activations_and_grads.release()
    return maps, logits


def gradcam_plus_plus(
    model: nn.Module,
    images: torch.Tensor,
    target_layer: nn.Module,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """Grad-CAM++ maps (N, H, W) in [0, 1] of each image's predicted class, and the logits."""
    return class_activation_maps(model, images, target_layer, "gradcam++", reshape_transform)


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
    method: str = "gradcam++"
    # (N,) the class whose probability is recorded (None: the positive class 1 of a binary model)
    explained_class: np.ndarray | None = None

    def probability_label(self, row: int) -> str:
        return f"p({1 if self.explained_class is None else int(self.explained_class[row])})"

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
            "method": self.method,
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
        return pd.DataFrame(
            {
                "image": names,
                # the class whose probability the next two columns give
                "probability_of_class": self.explained_class if self.explained_class is not None else np.ones(len(names), dtype=int),
                "probability_clean": self.probabilities_clean,
                "probability_marked": self.probabilities_marked,
                "predicted_clean": self.predicted_clean,
                "predicted_marked": self.predicted_marked,
                "marker_area": self.masks.reshape(len(self.masks), -1).mean(1),
                "cam_mass_on_markers_clean": self.mass_clean,
                "cam_mass_on_markers_marked": self.mass_marked,
            }
        )


def _take(value, rows: slice):
    return value if value is None or isinstance(value, str) else value[rows]


def _join(values: list):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    if values[0] is None or isinstance(values[0], str):
        return values[0]
    return np.concatenate(values)


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def add_markers(images: torch.Tensor, rng: np.random.Generator, config: MarkerConfig | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Markers burned into every image of a normalised batch; masks as (N, H, W) bool."""
    marked, masks = inject_markers_into_batch(images, rng, config or MarkerConfig(), NORMALIZE_MEAN, NORMALIZE_STD)
    return marked, masks[:, 0].cpu().numpy()


def measure_marker_sensitivity(
    model: nn.Module,
    images: torch.Tensor,
    marked: torch.Tensor,
    masks: np.ndarray,
    target_layer: str | None = None,
    method: str = "gradcam++",
    target_class: int | None = None,
) -> MarkerSensitivity:
    """CAMs (Grad-CAM++ or Score-CAM) of clean and marked images, each explaining the class predicted for it
    (or class index ``target_class``). The probabilities recorded are those of ``target_class``, else of the
    positive class (binary) or of each clean image's predicted class (K > 2 classes)."""
    check_cam_method(method)
    head = getattr(model, "head", None)
    if target_class is not None and isinstance(head, nn.Linear) and not 0 <= target_class < head.out_features:
        raise ValueError(f"target class {target_class} is not a class of this {head.out_features}-class model (0..{head.out_features - 1})")
    name, layer = resolve_target_layer(model, target_layer, images)
    reshape = token_reshape_transform(model, name)
    cams_clean, logits_clean = class_activation_maps(model, images, layer, method, reshape, target_class)
    cams_marked, logits_marked = class_activation_maps(model, marked, layer, method, reshape, target_class)
    num_classes = logits_clean.shape[1]
    rows = torch.arange(len(logits_clean))
    if target_class is not None:
        explained = torch.full_like(rows, int(target_class))
    else:
        explained = torch.full_like(rows, num_classes - 1) if num_classes == 2 else logits_clean.argmax(1)
    return MarkerSensitivity(
        images=images.detach().cpu(),
        marked=marked.detach().cpu(),
        masks=np.asarray(masks, dtype=bool),
        cams_clean=cams_clean,
        cams_marked=cams_marked,
        probabilities_clean=logits_clean.softmax(1)[rows, explained].numpy(),
        probabilities_marked=logits_marked.softmax(1)[rows, explained].numpy(),
        predicted_clean=logits_clean.argmax(1).numpy(),
        predicted_marked=logits_marked.argmax(1).numpy(),
        target_layer=name,
        method=method,
        explained_class=explained.numpy(),
    )


def _display(image: torch.Tensor) -> np.ndarray:
    """A normalised (1, H, W) image as float RGB in [0, 1] for overlays."""
    gray = (image[0].float().numpy() * NORMALIZE_STD + NORMALIZE_MEAN).clip(0, 1)
    return np.repeat(gray[..., None], 3, axis=2).astype(np.float32)


def save_overlay_grid(result: MarkerSensitivity, names: list[str], path: str | Path, labels: Sequence[int] | None = None) -> Path:
    """:func:`overlay_figure` written as a PNG (no date or software in the file)."""
    from tus.figures.style import METADATA

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay_figure(result, names, labels).savefig(path, dpi=150, metadata=METADATA["png"])
    return path


def overlay_figure(result: MarkerSensitivity, names: list[str], labels: Sequence[int] | None = None) -> Figure:
    """One row per image: image, its CAM, image + markers, its CAM (PNG).

    The CAM is drawn over the grayscale image in a perceptually uniform map (viridis, alpha
    0.5) with one colour bar; each image's title gives its true label (when ``labels`` are
    known), the predicted class and the recorded class's probability (``p(k)``: the positive class
    of a binary model, else the explained class); pixels stay square.
    """
    import matplotlib

    from tus.figures.style import RC, SEQUENCE_CMAP

    title = CAM_METHODS[result.method]
    rows = len(names)
    height, width = result.images.shape[-2:]
    panel = 1.6
    with matplotlib.rc_context(RC):
        figure = Figure(figsize=(4 * panel * width / height + 0.6, (panel + 0.45) * rows), layout="constrained")
        axes = figure.subplots(rows, 4, squeeze=False)
        mass_clean, mass_marked = result.mass_clean, result.mass_marked
        heat = None
        for row, name in enumerate(names):
            clean, marked = _display(result.images[row])[..., 0], _display(result.marked[row])[..., 0]
            truth = f"true {int(labels[row])}, " if labels is not None else ""
            panels = [
                # The file name only: full paths overflow into the neighbouring panel's title.
                (clean, None, f"{Path(name).name}\n{truth}pred {int(result.predicted_clean[row])}, {result.probability_label(row)}={result.probabilities_clean[row]:.2f}"),
                (clean, result.cams_clean[row], f"{title}, clean\nCAM mass on marker px {mass_clean[row]:.0%}"),
                (marked, None, f"+ markers\n{truth}pred {int(result.predicted_marked[row])}, {result.probability_label(row)}={result.probabilities_marked[row]:.2f}"),
                (marked, result.cams_marked[row], f"{title}, marked\nCAM mass on marker px {mass_marked[row]:.0%}"),
            ]
            for axis, (image, cam, text) in zip(axes[row], panels):
                axis.imshow(image, cmap="gray", vmin=0, vmax=1, aspect="equal", interpolation="nearest")
                if cam is not None:
                    heat = axis.imshow(cam, cmap=SEQUENCE_CMAP, vmin=0, vmax=1, alpha=0.5, aspect="equal")
                axis.set_title(text, fontsize=6)
                axis.set_axis_off()
        if heat is not None:
            figure.colorbar(heat, ax=axes[:, [1, 3]].ravel().tolist(), label=f"{title} (normalised, 0-1)", shrink=0.9 if rows > 1 else 0.7)
    return figure


def format_summary(summary: dict) -> str:
    return "\n".join(
        [
            f"images: {summary['num_images']}  ({CAM_METHODS[summary.get('method', 'gradcam++')]} layer: {summary['target_layer']})",
            f"predictions changed by markers: {summary['prediction_change_rate']:.1%}",
            f"mean |probability shift| (positive class; K > 2: each image's explained class): {summary['mean_probability_shift']:.3f}",
            f"CAM mass on marker pixels: clean {summary['cam_mass_on_markers_clean']:.1%} -> marked {summary['cam_mass_on_markers_marked']:.1%}"
            f" (marker pixels cover {summary['marker_area']:.1%} of the image)",
        ]
    )


def load_images(paths: list[Path], image_size: int) -> torch.Tensor:
    transform = eval_transform()
    return torch.stack([transform(resize_square(read_grayscale(p), image_size)) for p in paths])
