"""Command lines ``tus metrics`` and ``tus filter``: argv -> :func:`tus.stages.synthetic.run_metrics` /
:func:`tus.stages.synthetic.run_filter` (which check every option before any feature is computed)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tus.eval.options import FILTER_K, LINK_MODES, PRC_K, REAL_SIZE_AUTO, WEIGHTS_ENV_VAR


def default_cache_dir() -> Path:
    """Per-user feature cache: $XDG_CACHE_HOME/tus/features, else ~/.cache/tus/features."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tus" / "features"


def _add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", required=True, help="real images: a manifest CSV or an image folder")
    parser.add_argument("--generated", required=True, help="folder of generated images")
    parser.add_argument(
        "--extractor",
        default="inception",
        help="'inception' (FID Inception-v3) or a tus encoder export (the encoder/ folder of a tus pretrain run)",
    )
    parser.add_argument("--weights", help=f"Inception weights file (default: ${WEIGHTS_ENV_VAR}, else the packaged copy)")
    parser.add_argument("--image-size", type=int, help="encoder input size (default: the export's, else 224)")
    _add_real_size_argument(parser)
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="feature cache folder")
    parser.add_argument("--no-cache", action="store_true", help="recompute every feature")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")


def _add_real_size_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--real-size",
        default=REAL_SIZE_AUTO,
        help="side the real images are resized to before their features are taken: 'auto' (the generated images' size, as the generator saw the data), 'native' (as they are) or pixels",
    )


def _extraction_options(args: argparse.Namespace) -> dict:
    return {
        "extractor": args.extractor,
        "weights": args.weights,
        "image_size": args.image_size,
        "real_size": args.real_size,
        "cache_dir": None if args.no_cache else args.cache,
        "batch_size": args.batch_size,
        "device": args.device,
        "progress": True,
    }


def metrics_main(argv: list[str] | None = None) -> int:
    """``tus metrics``: FID, Inception Score, precision and recall of generated images."""
    parser = argparse.ArgumentParser(prog="tus metrics", description=metrics_main.__doc__)
    _add_extraction_arguments(parser)
    parser.add_argument("--out", type=Path, help="write the metrics as JSON here")
    parser.add_argument("--prc-k", type=int, default=PRC_K, help="neighbours for precision/recall")
    parser.add_argument("--seed", type=int, default=0, help="seed for drawing the real reference batches")
    parser.add_argument("--per-class", action="store_true", help="also score each class: class-y samples against class-y real images (both labelled)")
    parser.add_argument("--faithfulness-model", help="a fine-tuned classifier (a CV fold, e.g. RUN/runs/fold0-seed0, or a CV run dir): the share of samples it assigns to their label")
    args = parser.parse_args(argv)
    from tus.stages.synthetic import format_metrics_report, run_metrics  # torch: not needed for --help

    metrics = run_metrics(args.real, args.generated, args.out, prc_k=args.prc_k, seed=args.seed, per_class=args.per_class, faithfulness_model=args.faithfulness_model, **_extraction_options(args))
    print(format_metrics_report(metrics, args.out))
    return 0


def _ks(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 10,20,50,100, got {text!r}") from error


def filter_main(argv: list[str] | None = None) -> int:
    """``tus filter``: keep the generated images inside the real k-NN manifold."""
    parser = argparse.ArgumentParser(prog="tus filter", description=filter_main.__doc__)
    _add_extraction_arguments(parser)
    parser.add_argument("--k", type=int, default=FILTER_K, help="neighbours defining each real ball's radius")
    parser.add_argument("--out", type=Path, required=True, help="new output folder (must not exist or be empty)")
    parser.add_argument("--link", choices=LINK_MODES, default="hardlink", help="how kept images are placed in --out")
    parser.add_argument("--organ", help="organ column for the kept images' manifest")
    parser.add_argument("--sweep", type=_ks, help="also sweep these k (e.g. 10,20,50,100) into OUT/sweep")
    parser.add_argument("--labeled", help="a labelled manifest: report, per fold, the real images that are labelled images (leakage check)")
    parser.add_argument("--folds", type=int, default=3, help="with --labeled and no 'fold' column: folds drawn as finetune-cv does")
    parser.add_argument("--fold-seed", type=int, default=0)
    parser.add_argument("--per-class", action="store_true", help="keep a class-y sample when it is in the class-y real manifold (both manifests labelled)")
    args = parser.parse_args(argv)
    from tus.stages.synthetic import format_filter_report, run_filter  # torch: not needed for --help

    report = run_filter(
        args.real,
        args.generated,
        args.out,
        k=args.k,
        organ=args.organ,
        sweep=args.sweep,
        link=args.link,
        labeled=args.labeled,
        num_folds=args.folds,
        fold_seed=args.fold_seed,
        per_class=args.per_class,
        **_extraction_options(args),
    )
    print(format_filter_report(report))
    return 0


def _scales(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0,1,2,4, got {text!r}") from error


def guidance_sweep_main(argv: list[str] | None = None) -> int:
    """``tus guidance-sweep``: samples of a class-conditional model at several guidance scales w, their FID and
    precision/recall (overall and per class) and label faithfulness, and the faithfulness-vs-FID figure."""
    parser = argparse.ArgumentParser(prog="tus guidance-sweep", description=guidance_sweep_main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a class-conditional diffusion run dir or export")
    parser.add_argument("--real", required=True, help="labelled manifest: the class mix sampled, and the real images scored against")
    parser.add_argument("--model", required=True, help="classifier judging faithfulness: a CV fold (RUN/runs/fold0-seed0) or a CV run dir")
    parser.add_argument("--out", type=Path, required=True, help="folder for w<w>/ sample folders, sweep.csv and guidance_tradeoff.{png,pdf,csv}")
    parser.add_argument("--guidance", type=_scales, default=[0.0, 1.0, 2.0, 4.0], help="scales w (default 0,1,2,4)")
    parser.add_argument("--n", type=int, default=500, help="samples per scale")
    parser.add_argument("--sampler", default="respaced")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-batch-size", type=int, default=16)
    parser.add_argument("--extractor", default="inception", help="'inception' or a tus encoder export")
    parser.add_argument("--weights", help=f"Inception weights file (default: ${WEIGHTS_ENV_VAR}, else the packaged copy)")
    parser.add_argument("--image-size", type=int, help="encoder input size (default: the export's, else 224)")
    _add_real_size_argument(parser)
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="feature cache folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from tus.stages.synthetic import run_guidance_sweep  # torch: not needed for --help

    table = run_guidance_sweep(
        args.checkpoint,
        args.real,
        args.model,
        args.out,
        guidances=args.guidance,
        n=args.n,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        sample_batch_size=args.sample_batch_size,
        extractor=args.extractor,
        weights=args.weights,
        image_size=args.image_size,
        real_size=args.real_size,
        cache_dir=args.cache,
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {args.out / 'sweep.csv'} and {args.out / 'guidance_tradeoff.png'} (.pdf, .csv)")
    return 0
