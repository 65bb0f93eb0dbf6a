"""Explanation stage: Grad-CAM++ (or Score-CAM) overlays of images with and without synthetic markers, and how
much the markers move a fine-tuned classifier (:func:`run_explain`, callable from a notebook).

The checkpoint, the options and the image list are checked before the model is built or anything is written:
a wrong option raises :class:`~tus.data.images.UsageError` (exit code 2 on the command line), a wrong file a
``DataError`` such as :class:`~tus.models.weights.CheckpointError` (exit code 1). Messages name the
command-line option (``--image-size``) as :func:`tus.stages.sample.generate` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from tus.data.images import IMAGE_SUFFIXES, DataError, OutputExistsError, UsageError, list_images
from tus.data.manifest import load_manifest
from tus.eval.explain import (
    CAM_METHODS,
    MarkerSensitivity,
    add_markers,
    load_images,
    measure_marker_sensitivity,
    save_overlay_grid,
)
from tus.methods.classifier import load_finetuned
from tus.models.export import load_export
from tus.models.weights import CheckpointError, load_weights
from tus.tracking import track_explain


def collect_images(sources: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(name, path) for each image named directly, inside a folder, or listed in a manifest."""
    found: list[tuple[str, Path]] = []
    for source in sources:
        path = Path(source)
        if path.suffix.lower() == ".csv":
            frame = load_manifest(path, require_labels=False, decode_images=False)
            found += [(str(s), Path(p)) for s, p in zip(frame["sample_id"], frame["abs_path"])]
        elif path.is_dir():
            found += [(str(p), p) for p in list_images(path)]
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append((str(path), path))
        else:
            raise FileNotFoundError(f"{source}: not an image file, a folder of images or a manifest (.csv)")
    if not found:
        raise FileNotFoundError(f"no images found in {[str(s) for s in sources]}")
    return found


def _training_data_setting(checkpoint: Path, key: str, option: str):
    """``data.<key>`` of the run that produced ``checkpoint`` (the nearest config.yaml above it),
    or None; an unreadable config is refused in one line naming ``option``."""
    for folder in list(checkpoint.resolve().parents)[:4]:
        config = folder / "config.yaml"
        if config.is_file():
            try:
                settings = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
                return settings.get("data", {}).get(key) if isinstance(settings, dict) else None
            except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise DataError(f"{config}: cannot read data.{key} ({reason}); {option}") from error
    return None


def training_image_size(checkpoint: Path) -> int | None:
    """The ``data.image_size`` of the run that produced ``checkpoint`` (its config.yaml)."""
    size = _training_data_setting(checkpoint, "image_size", "give --image-size")
    try:
        return int(size) if size else None
    except (TypeError, ValueError) as error:
        raise DataError(f"{checkpoint}: its run's data.image_size {size!r} is not a number; give --image-size") from error


def training_label_names(checkpoint: Path) -> list[str]:
    """The ``data.label_names`` of the run that produced a ``.ckpt`` (its config.yaml; a K > 2 run
    writes the classes it found there), or [] for a binary run or a checkpoint outside a run dir."""
    names = _training_data_setting(checkpoint, "label_names", "give --target-class as an index")
    return [str(name) for name in names] if isinstance(names, list) else []


def check_classifier_checkpoint(path: Path) -> int | None:
    """Refuse, in one line, a ``--checkpoint`` that is not a fine-tuned classifier; read it only safely.

    A Lightning ``.ckpt`` must hold ``hyper_parameters`` with a ``backbone`` section and a ``state_dict``;
    an export (its folder, ``config.json`` or ``model.safetensors``; an old ``.safetensors`` + ``.json``) must be a
    classifier export, not an encoder or diffusion one. Returns the export's training ``image_size`` when recorded.
    """
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path}: not found")
    if path.suffix == ".ckpt":
        checkpoint = load_weights(path)
        hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not isinstance(hparams, dict) or not isinstance(hparams.get("backbone"), dict) or "state_dict" not in checkpoint:
            raise CheckpointError(f"{path}: not a tus fine-tuning checkpoint (no classifier hyper_parameters/state_dict)")
        return None
    if path.is_file() and path.suffix not in (".safetensors", ".json"):
        raise CheckpointError(f"{path}: --checkpoint must be a fine-tuned model (its folder or model.safetensors) or a .ckpt")
    config, _ = load_export(path, "classifier")
    return config.get("image_size")


def resolve_target_class(checkpoint: Path, target_class: int | str | None, num_classes: int) -> int | None:
    """``--target-class`` as a class index: an index 0..K-1 or a class name (an export's
    ``label_names``; a ``.ckpt``'s from its run's config.yaml)."""
    if target_class is None:
        return None
    names = training_label_names(checkpoint) if checkpoint.suffix == ".ckpt" else list(load_export(checkpoint, "classifier")[0].get("label_names") or [])
    text = str(target_class).strip()
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < num_classes:
        return int(text)
    raise UsageError(f"--target-class {text!r}: not a class of this {num_classes}-class model (an index 0..{num_classes - 1}{' or one of ' + str(names) if names else ''})")


def run_explain(
    checkpoint: str | Path,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "gradcam++",
    image_size: int | None = None,
    target_layer: str | None = None,
    seed: int = 0,
    rows_per_page: int = 8,
    batch_size: int = 32,
    target_class: int | str | None = None,
) -> dict:
    """Explain a fine-tuned classifier on ``images`` (image files, folders of images or manifests) into the new
    folder ``out``.

    Each image is explained clean and with synthetic markers burned in (drawn with ``seed``); both are
    explained for the class predicted for them. ``out`` gets ``overlays-NNN.png`` (``rows_per_page`` images per
    page), ``per_image.csv`` and ``marker_sensitivity.json``, whose content is returned. ``image_size`` defaults
    to the export's, else the training run's ``data.image_size``; ``target_layer`` (a dotted module name such as
    ``backbone.layer4``) to the last layer with a spatial map. ``target_class`` (an index or a class name of the
    export's ``label_names``) explains that class for every image instead of the predicted one.
    """
    out, checkpoint = Path(out), Path(checkpoint)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"--out {out}: exists and is not an empty folder; outputs go to a new folder")
    if method not in CAM_METHODS:
        raise UsageError(f"--method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    for option, value in (("--image-size", image_size), ("--rows-per-page", rows_per_page), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    exported_size = check_classifier_checkpoint(checkpoint)
    image_size = image_size or exported_size or training_image_size(checkpoint)
    if image_size is None:
        raise UsageError(f"--image-size: no config.yaml found beside {checkpoint} to read it from; give --image-size")
    listed = collect_images([images] if isinstance(images, (str, Path)) else images)
    model = load_finetuned(checkpoint)
    target = resolve_target_class(checkpoint, target_class, int(model.head.out_features))
    rng = np.random.default_rng(seed)
    results: list[MarkerSensitivity] = []
    for start in range(0, len(listed), batch_size):
        batch = load_images([path for _, path in listed[start : start + batch_size]], image_size)
        marked, masks = add_markers(batch, rng)
        results.append(measure_marker_sensitivity(model, batch, marked, masks, target_layer, method, target))
    result = MarkerSensitivity.concatenate(results)
    names = [name for name, _ in listed]
    out.mkdir(parents=True, exist_ok=True)
    for page, start in enumerate(range(0, len(names), rows_per_page)):
        rows = slice(start, start + rows_per_page)
        save_overlay_grid(result.rows(rows), names[rows], out / f"overlays-{page:03d}.png")
    result.per_image(names).to_csv(out / "per_image.csv", index=False)
    summary = {**result.summary(), "checkpoint": str(checkpoint.resolve()), "image_size": image_size, "seed": seed}
    if target is not None:
        summary["target_class"] = target
    (out / "marker_sensitivity.json").write_text(json.dumps(summary, indent=2))
    track_explain(out, summary, checkpoint)
    return summary
