"""Synthetic-image evaluation stages: :func:`run_metrics` and :func:`run_filter`, callable from a notebook.

``run_metrics`` scores generated images against real ones (FID, Inception Score, improved
precision/recall; TesticulUS Sec. 4.2, see :mod:`tus.eval.metrics`); ``run_filter`` keeps the
generated images inside the k-NN manifold of the real ones (Kynkäänniemi et al. 2019's
improved precision applied per sample, see :mod:`tus.eval.filtering`).

Every option is checked before any weights are loaded or features computed, so a mistake costs
no extraction: a wrong option raises :class:`~tus.data.images.UsageError` (exit code 2 on the
command line), a wrong input file a ``DataError`` (exit code 1). Messages name the command-line
option (``--batch-size``) as :func:`tus.stages.sample.generate` does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tus.data.images import UsageError, list_images
from tus.data.manifest import load_manifest
from tus.data.outputs import check_output_file, claim_output
from tus.data.overlap import find_overlap, format_overlap, labeled_folds, overlap_report
from tus.eval import filtering
from tus.eval.features import EncoderExtractor, FeatureExtractor, InceptionExtractor, load_tus_encoder
from tus.eval.filtering import FILTER_K, LINK_MODES, check_filter_arguments, filter_generated, generated_labels, real_labels
from tus.eval.metrics import PRC_K, compute_metrics, format_metrics_table, image_paths, save_metrics
from tus.eval.options import REAL_SIZE_AUTO, parse_real_size
from tus.runs import write_json_atomic
from tus.stages.predict import Predictor, load_predictor, member_probabilities
from tus.tracking import track_filter

DEFAULT_ENCODER_IMAGE_SIZE = 224

ExtractorSpec = str | Path | FeatureExtractor


def check_extraction_options(extractor: ExtractorSpec, weights: str | Path | None, image_size: int | None, batch_size: int, real_size: str | int = REAL_SIZE_AUTO) -> None:
    """The feature-extraction options, checked without loading anything."""
    for option, value in (("--batch-size", batch_size), ("--image-size", image_size)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    try:
        parse_real_size(real_size)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if weights and (isinstance(extractor, FeatureExtractor) or str(extractor) != "inception"):
        raise UsageError("--weights sets the Inception weights; it cannot be combined with --extractor ENCODER")
    if image_size is not None and isinstance(extractor, FeatureExtractor):
        raise UsageError("--image-size sets a tus encoder's input size; a FeatureExtractor object brings its own")
    if image_size is not None and str(extractor) == "inception":
        raise UsageError("--image-size sets a tus encoder's input size; the Inception extractor resizes every image to 299 px itself")


def build_extractor(extractor: ExtractorSpec, weights: str | Path | None = None, image_size: int | None = None) -> FeatureExtractor:
    """``'inception'`` (FID Inception-v3 from ``weights``, else ``$TUS_INCEPTION_WEIGHTS``, else the packaged
    copy), a tus encoder export (its input size: ``image_size``, else the export's, else 224), or an extractor
    object, returned as it is."""
    if isinstance(extractor, FeatureExtractor):
        return extractor
    if str(extractor) == "inception":
        return InceptionExtractor(weights)
    encoder, meta = load_tus_encoder(extractor)
    size = image_size or meta.get("image_size") or DEFAULT_ENCODER_IMAGE_SIZE
    return EncoderExtractor(encoder, image_size=size, name=meta["architecture"]["name"])


def run_metrics(
    real: str | Path,
    generated: str | Path,
    out: str | Path | None = None,
    *,
    extractor: ExtractorSpec = "inception",
    weights: str | Path | None = None,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    prc_k: int = PRC_K,
    seed: int = 0,
    progress: bool = False,
    per_class: bool = False,
    faithfulness_model: str | Path | None = None,
    real_size: str | int = REAL_SIZE_AUTO,
) -> dict:
    """FID, Inception Score and precision/recall of the images in ``generated`` against ``real`` (a manifest
    CSV or an image folder); the metrics dict, also written as JSON to the file ``out`` when given.

    ``per_class``: also each class's metrics (``per_class`` in the dict): the class-y samples (labels from the
    samples' ``manifest.csv``, as ``tus sample --label`` writes it) against the class-y real images (``real``
    a labelled manifest).

    ``faithfulness_model`` (a fine-tuned classifier: a fold model ``<cv>/runs/fold0-seed0`` or a CV run dir, an
    ensemble of its folds): ``faithfulness`` in the dict, the share of samples it assigns to their conditioning
    label (:func:`label_faithfulness`). Use a model whose training folds the generator's pool matches.

    ``cache_dir`` keeps features between calls (None: compute every feature); ``seed`` draws the real
    reference batches of precision/recall; ``real_size`` the resolution both sets are compared at
    (:func:`tus.eval.metrics.comparison_size`; "auto": the generated images' size).
    """
    check_extraction_options(extractor, weights, image_size, batch_size, real_size)
    if prc_k < 1:
        raise UsageError(f"--prc-k must be >= 1, got {prc_k}")
    if out is not None:
        check_output_file(Path(out), "--out")
    real_paths, generated_paths = image_paths(real), image_paths(generated)
    labels = None
    if per_class:  # both sets' labels, before any feature is computed
        if not Path(generated).is_dir():
            raise UsageError(f"--per-class: --generated {generated} must be a tus sample folder (its manifest.csv has the labels)")
        labels = (real_labels(real), generated_labels(generated, generated_paths))
    predictor = None
    if faithfulness_model is not None:
        if not Path(generated).is_dir():
            raise UsageError(f"--faithfulness-model: --generated {generated} must be a tus sample folder (its manifest.csv has the labels)")
        generated_labels(generated, generated_paths)
        predictor = load_predictor(faithfulness_model)  # refused in one line before any feature
    # --out is checked writable and locked before any feature is computed.
    with claim_output(out, "--out", folder=False) if out is not None else contextlib.nullcontext():
        metrics = _score(real_paths, generated_paths, None, extractor, weights, image_size, cache_dir, batch_size, device, prc_k, seed, progress, labels, real_size)
        if predictor is not None:
            metrics["faithfulness"] = label_faithfulness(predictor, generated, batch_size=batch_size)
        if out is not None:
            save_metrics(metrics, out)
        return metrics


def label_faithfulness(predictor: Predictor | str | Path, generated: str | Path, *, batch_size: int = 64) -> dict:
    """How often a classifier trained on real images assigns each sample of the folder ``generated`` to the
    label it was drawn for (its ``manifest.csv``): ``accuracy`` over all samples and per class
    (``per_class``: {label: {num_images, accuracy}}). The classifier's argmax decides (for two classes the
    0.5 threshold, not a tuned one), averaging a CV's fold models' probabilities."""
    predictor = predictor if isinstance(predictor, Predictor) else load_predictor(predictor)
    paths = image_paths(generated)
    labels = generated_labels(generated, paths)
    outside = sorted({int(y) for y in labels if not 0 <= y < predictor.num_classes})
    if outside:
        raise UsageError(f"{generated}: label(s) {outside} outside the classifier's {predictor.num_classes} classes ({predictor.source})")
    probabilities = member_probabilities(predictor, [str(p) for p in paths], batch_size=batch_size, progress=False).mean(0)
    correct = probabilities.argmax(1) == labels
    per_class = {str(y): {"num_images": int((labels == y).sum()), "accuracy": float(correct[labels == y].mean())} for y in sorted(set(labels.tolist()))}
    return {"model": str(predictor.source), "num_images": len(paths), "accuracy": float(correct.mean()), "per_class": per_class}


def _score(real_paths, generated_paths, out, extractor, weights, image_size, cache_dir, batch_size, device, prc_k, seed, progress, labels=None, real_size=REAL_SIZE_AUTO) -> dict:
    metrics = compute_metrics(
        real_paths,
        generated_paths,
        build_extractor(extractor, weights, image_size),
        prc_k=prc_k,
        seed=seed,
        batch_size=batch_size,
        device=device,
        cache_dir=cache_dir,
        progress=progress,
        real_labels=None if labels is None else labels[0],
        generated_labels=None if labels is None else labels[1],
        real_size=real_size,
    )
    if out is not None:
        save_metrics(metrics, out)
    return metrics


def format_metrics_report(metrics: dict, out: str | Path | None = None) -> str:
    """What ``tus metrics`` prints: the metrics table (and label faithfulness), then where it was written."""
    text = format_metrics_table(metrics)
    if metrics.get("faithfulness"):
        faith = metrics["faithfulness"]
        classes = ", ".join(f"class {y}: {100 * c['accuracy']:.1f}% of {c['num_images']}" for y, c in faith["per_class"].items())
        text += f"\nlabel faithfulness ({faith['model']}): {100 * faith['accuracy']:.1f}% of {faith['num_images']} samples classified as their label ({classes})"
    return text + (f"\nwrote {out}" if out is not None else "")


def run_guidance_sweep(
    checkpoint: str | Path,
    real: str | Path,
    model: str | Path,
    out: str | Path,
    *,
    guidances: Sequence[float] = (0.0, 1.0, 2.0, 4.0),
    n: int = 500,
    sampler: str = "respaced",
    steps: int | None = 100,
    seed: int = 0,
    sample_batch_size: int = 16,
    extractor: ExtractorSpec = "inception",
    weights: str | Path | None = None,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
    real_size: str | int = REAL_SIZE_AUTO,
) -> pd.DataFrame:
    """The guidance trade-off of a class-conditional model: for each w, ``n`` samples drawn with the class mix of
    ``real`` (``tus sample --labels-from real --guidance w`` into ``out/w<w>``), their FID and precision/recall
    against ``real`` (overall and per class) and their label faithfulness under ``model``; writes
    ``out/w<w>/metrics.json``, ``out/sweep.csv`` and the figure ``out/guidance_tradeoff.{png,pdf,csv}``.
    Sample folders continue when run again (same settings); returns the sweep table."""
    from tus.figures.guidance import tradeoff_data, tradeoff_figure
    from tus.figures.style import save
    from tus.stages.sample import generate

    if not guidances or any(w < 0 for w in guidances):
        raise UsageError(f"--guidance must list scales >= 0, got {list(guidances)}")
    check_extraction_options(extractor, weights, image_size, batch_size, real_size)
    real_labels(real)  # a labelled manifest, before anything is sampled
    predictor = load_predictor(model)
    out = Path(out)
    rows = []
    for w in guidances:
        folder = out / f"w{w:g}"
        generate(checkpoint, folder, n, sampler=sampler, steps=steps, seed=seed, batch_size=sample_batch_size, device=device, progress=progress, labels_from=real, guidance=float(w))
        generated_paths = image_paths(folder)
        labels = (real_labels(real), generated_labels(folder, generated_paths))
        metrics = _score(image_paths(real), generated_paths, None, extractor, weights, image_size, cache_dir, batch_size, device, PRC_K, seed, progress, labels, real_size)
        metrics["faithfulness"] = label_faithfulness(predictor, folder, batch_size=batch_size)
        metrics["guidance"] = float(w)
        save_metrics(metrics, folder / "metrics.json")
        rows.append(
            {
                "guidance": float(w),
                "fid": metrics["fid"],
                "faithfulness": metrics["faithfulness"]["accuracy"],
                "precision": metrics["precision_mean"],
                "recall": metrics["recall_mean"],
                "num_generated": metrics["num_generated"],
            }
        )
    table = tradeoff_data(rows)
    table.to_csv(out / "sweep.csv", index=False)
    save(tradeoff_figure(table), out, "guidance_tradeoff")
    return table


def run_filter(
    real: str | Path,
    generated: str | Path,
    out: str | Path,
    *,
    k: int = FILTER_K,
    organ: str | None = None,
    sweep: Sequence[int] | None = None,
    link: str = "hardlink",
    extractor: ExtractorSpec = "inception",
    weights: str | Path | None = None,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
    labeled: str | Path | None = None,
    num_folds: int = 3,
    fold_seed: int = 0,
    per_class: bool = False,
    real_size: str | int = REAL_SIZE_AUTO,
) -> dict:
    """Keep the images of ``generated`` inside the k-NN manifold of ``real`` into the new folder ``out``.

    ``per_class``: a class-``y`` sample is kept when it falls in the class-``y`` real manifold (both sets
    labelled: ``real`` a manifest with ``label``, ``generated`` with the ``manifest.csv`` of ``tus sample --label``).

    ``out`` gets ``images/`` (kept images, hard-linked or copied per ``link``), ``manifest.csv`` (with an
    ``organ`` column when ``organ`` is given), ``filter.csv`` and ``filter.json``; it is written in a hidden
    sibling folder renamed to ``out`` only when complete. With ``sweep`` (e.g. ``[10, 20, 50, 100]``),
    ``out/sweep`` also gets the metrics of the kept set for each of those k (:func:`tus.eval.filtering.sweep`).
    Returns the content of ``filter.json`` plus ``out_dir`` and ``sweep`` (the sweep report, or None).

    ``labeled`` (a labelled manifest): the leakage check. The reference's real set holds its
    labelled images, so the filter (and the diffusion model) saw test-fold images; the images of
    ``real`` equal to a labelled image are reported per fold (the manifest's ``fold`` column, else
    ``num_folds`` folds drawn with ``fold_seed`` as ``finetune-cv`` does) in ``labeled_overlap.json``
    and under ``labeled_overlap`` in the returned report.
    """
    check_extraction_options(extractor, weights, image_size, batch_size, real_size)
    if link not in LINK_MODES:
        raise UsageError(f"--link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    check_filter_arguments(real, generated, out, k, sweep, per_class)
    labeled_frame = load_manifest(labeled, require_labels=True) if labeled is not None else None  # checked before any feature
    with claim_output(out, "--out"):  # writable and locked before any feature is computed
        return _filter(
            real, generated, Path(out), k, organ, sweep, link, extractor, weights, image_size, cache_dir, batch_size, device, progress, labeled_frame, num_folds, fold_seed, per_class, real_size
        )


def _filter(
    real,
    generated,
    out: Path,
    k,
    organ,
    sweep,
    link,
    extractor,
    weights,
    image_size,
    cache_dir,
    batch_size,
    device,
    progress,
    labeled_frame,
    num_folds,
    fold_seed,
    per_class=False,
    real_size=REAL_SIZE_AUTO,
) -> dict:
    common = {
        "extractor": build_extractor(extractor, weights, image_size),
        "real_size": real_size,
        "cache_dir": cache_dir,
        "batch_size": batch_size,
        "device": device,
        "progress": progress,
    }
    result = filter_generated(real, generated, out, k=k, link=link, organ=organ, per_class=per_class, **common)
    report = json.loads((result.out_dir / "filter.json").read_text(encoding="utf-8"))
    report["out_dir"] = str(result.out_dir)
    report["sweep"] = filtering.sweep(real, generated, result.out_dir / "sweep", ks=sweep, highlight_k=k, **common) if sweep else None
    report["labeled_overlap"] = None
    if labeled_frame is not None:
        real_frame = _image_frame(real)
        folds = labeled_folds(labeled_frame, num_folds, fold_seed)
        report["labeled_overlap"] = overlap_report(find_overlap(real_frame, labeled_frame, folds), folds, len(real_frame))
        write_json_atomic(result.out_dir / "labeled_overlap.json", report["labeled_overlap"])
    track_filter(result.out_dir, report, Path(generated), Path(real))
    return report


def _image_frame(source: str | Path):
    """``abs_path`` and ``sample_id`` of a manifest's or a folder's images (what the overlap check takes)."""
    if Path(source).is_file():
        return load_manifest(source, require_labels=False)
    paths = [str(p) for p in list_images(source)]
    return pd.DataFrame({"abs_path": paths, "sample_id": [Path(p).name for p in paths]})


def format_filter_report(report: dict) -> str:
    """What ``tus filter`` prints: kept/rejected counts at k (and at each swept k) and where they went."""
    lines = [f"k={report['k']}: kept {report['kept']}, rejected {report['rejected']} of {report['num_generated']}; wrote {report['out_dir']}"]
    if report.get("sweep"):
        lines += [f"k={row['k']}: kept {row['kept']}, rejected {row['rejected']}" for row in report["sweep"]["sweep"]]
        lines.append(f"wrote {Path(report['out_dir']) / 'sweep'}")
    if report.get("labeled_overlap"):
        lines.append("real images that are labelled images (leakage check):")
        lines.append(format_overlap(report["labeled_overlap"]))
    return "\n".join(lines)
