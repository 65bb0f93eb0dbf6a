"""``tus explain``: argv -> :func:`tus.stages.explain.run_explain` (Grad-CAM++ overlays and marker sensitivity
of a fine-tuned model)."""

from __future__ import annotations

import argparse

from tus.eval.options import CAM_METHODS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tus explain", description="Grad-CAM++ overlays of images with and without synthetic markers, and how much markers move the model.")
    parser.add_argument("--checkpoint", required=True, help="a fine-tuned classifier: its export folder or model.safetensors, or a Lightning .ckpt")
    parser.add_argument("--images", nargs="+", required=True, metavar="FILE_FOLDER_OR_MANIFEST")
    parser.add_argument("--out", required=True, help="new output folder")
    parser.add_argument("--target-layer", default=None, help="dotted module name, e.g. backbone.layer4 (default: the last spatial layer)")
    parser.add_argument("--method", choices=list(CAM_METHODS), default="gradcam++", help="CAM method: gradcam++ or scorecam (gradient-free, slower)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the marker draws")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the training run's data.image_size)")
    parser.add_argument("--target-class", default=None, help="explain this class (index or name) for every image instead of each image's predicted class")
    parser.add_argument("--rows-per-page", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    # Imported here: building the classifier pulls in Lightning and timm, which `tus explain --help` does not need.
    from tus.eval.explain import format_summary
    from tus.stages.explain import run_explain

    summary = run_explain(
        args.checkpoint,
        args.images,
        args.out,
        method=args.method,
        image_size=args.image_size,
        target_layer=args.target_layer,
        seed=args.seed,
        rows_per_page=args.rows_per_page,
        batch_size=args.batch_size,
        target_class=args.target_class,
    )
    print(format_summary(summary))
    print(f"written to {args.out}")
    return 0
