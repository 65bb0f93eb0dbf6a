"""``tus predict``: a trained classifier on new images (:func:`tus.stages.predict.run_predict`)."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tus predict",
        description="Run a trained classifier (a CV run's fold ensemble, one fold model or the refit model) on a folder of images or a manifest.",
        epilog="Preprocessing (image size, channels, normalisation) comes from the model's config.json; the threshold from its decision (0.5 if none).",
    )
    parser.add_argument("--model", required=True, help="a CV run dir (the ensemble of its fold models), or one model folder (runs/fold<F>-seed<S>, runs/refit-seed<S>)")
    parser.add_argument("--images", required=True, help="a folder of images, or a manifest CSV (with labels: metrics and CIs too)")
    parser.add_argument("--out", required=True, help="the new predictions CSV")
    parser.add_argument("--seed", type=int, default=None, help="with a CV run dir: the fold models of this seed only (default: every seed)")
    parser.add_argument("--refit", action="store_true", help="with a CV run dir: its refit model(s) instead of the fold ensemble")
    parser.add_argument(
        "--crop",
        choices=["auto", "none"],
        default="auto",
        help="auto: cut each image into views as the model's training set was (tus data crop's recipe; nothing if it was not cropped); none: the images are already cropped views",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding images (0: in this process)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log a W&B run (offline unless WANDB_MODE says otherwise; group from WANDB_RUN_GROUP) in <out stem>.wandb/: the models it used and the predictions as an artifact",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)

    from tus.stages.predict import render_labelled_summary, run_predict

    result = run_predict(args.model, args.images, args.out, seed=args.seed, refit=args.refit, batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress, crop=args.crop)
    print(f"{result['images']} {'views' if result['cropped'] else 'images'}, {result['kind']} of {len(result['members'])} model(s), threshold {result['threshold']:.4g} -> {result['out']}")
    if result["labelled"] is not None:
        print(render_labelled_summary(result["labelled"], result["kind"]))
    if args.wandb:
        from pathlib import Path

        from tus.tracking import track_predict

        track_predict(Path(result["out"]), result)
    return 0
