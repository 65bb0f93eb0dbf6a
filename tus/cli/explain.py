"""``tus explain``: Grad-CAM++ overlays and marker sensitivity of a fine-tuned model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from tus.data.images import IMAGE_SUFFIXES, list_images
from tus.data.manifest import load_manifest
from tus.eval.explain import MarkerSensitivity, add_markers, format_summary, load_images, measure_marker_sensitivity, save_overlay_grid


def collect_images(sources: list[str]) -> list[tuple[str, Path]]:
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
        raise FileNotFoundError(f"no images found in {sources}")
    return found


def training_image_size(checkpoint: Path) -> int | None:
    """The ``data.image_size`` of the run that produced ``checkpoint`` (its config.yaml)."""
    for folder in list(checkpoint.resolve().parents)[:4]:
        config = folder / "config.yaml"
        if config.is_file():
            size = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("image_size")
            if size:
                return int(size)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tus explain", description="Grad-CAM++ overlays of images with and without synthetic markers, and how much markers move the model.")
    parser.add_argument("--checkpoint", required=True, help="a fine-tuned classifier: model.safetensors (+ .json) or a Lightning .ckpt")
    parser.add_argument("--images", nargs="+", required=True, metavar="FILE_FOLDER_OR_MANIFEST")
    parser.add_argument("--out", required=True, help="new output folder")
    parser.add_argument("--target-layer", default=None, help="dotted module name, e.g. backbone.layer4 (default: the last spatial layer)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the marker draws")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the training run's data.image_size)")
    parser.add_argument("--rows-per-page", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    from tus.methods.classifier import load_finetuned

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} exists and is not empty; outputs go to a new folder")
    checkpoint = Path(args.checkpoint)
    image_size = args.image_size or training_image_size(checkpoint)
    if image_size is None:
        parser.error(f"no config.yaml found beside {checkpoint}; give --image-size")
    model = load_finetuned(checkpoint)
    images = collect_images(args.images)
    rng = np.random.default_rng(args.seed)
    results: list[MarkerSensitivity] = []
    for start in range(0, len(images), args.batch_size):
        chunk = images[start : start + args.batch_size]
        batch = load_images([p for _, p in chunk], image_size)
        marked, masks = add_markers(batch, rng)
        results.append(measure_marker_sensitivity(model, batch, marked, masks, args.target_layer))
    result = MarkerSensitivity.concatenate(results)
    names = [name for name, _ in images]
    out.mkdir(parents=True, exist_ok=True)
    for page, start in enumerate(range(0, len(names), args.rows_per_page)):
        rows = slice(start, start + args.rows_per_page)
        save_overlay_grid(result.rows(rows), names[rows], out / f"overlays-{page:03d}.png")
    result.per_image(names).to_csv(out / "per_image.csv", index=False)
    summary = {**result.summary(), "checkpoint": str(checkpoint.resolve()), "image_size": image_size, "seed": args.seed}
    (out / "marker_sensitivity.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    print(f"written to {out}")
    return 0
