"""FID, Inception Score and improved precision/recall of generated images against real ones.

The protocol follows TesticulUS (paper Sec. 4.2, after Dhariwal & Nichol): precision and
recall use k = 3 neighbours against three non-overlapping reference batches of 64 real
images, each compared with the whole generated set, and are reported as mean +- std (std
with ddof 0) over the batches. With fewer than 3 x 64 real images the batches shrink (as many
full batches of 64 as fit, else one batch of every real image) and ``notes`` says so. FID
compares all real with all generated features; the Inception Score uses torch-fidelity's
splits (10 by default) and is reported only when the extractor has class logits.

Both sets are compared at one resolution: by default (``real_size="auto"``) the real images are
first resized to the generated images' size (with the training data's own resize,
:func:`tus.data.cache.resize_square`), as FID is computed for any generator trained below the
data's resolution; otherwise a 32 px generator is scored on the full-resolution detail it never
saw (on the 128 px demo phantom, held-out real images resized to 32 px scored FID ~220 and fell
inside the 128 px real manifold 9 times in 32, but 31 times in 32 once the real set was at 32 px).
torch-fidelity computes IS, and FID where there are more images than feature dimensions
(with fewer, :func:`frechet_distance_low_rank` gives its value without the d x d
eigenproblem: 0.08 s instead of 23-30 s for 60 vs 60 images); precision/recall use
:mod:`tus.eval.manifold`, which matches torch-fidelity's ``prc``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

from tus.data.images import DataError, list_images, not_an_image_file, read_grayscale
from tus.data.manifest import read_manifest
from tus.eval.features import FEATURES, LOGITS, FeatureExtractor
from tus.eval.manifold import improved_precision_recall
from tus.eval.options import PRC_K as PRC_K
from tus.eval.options import REAL_SIZE_AUTO, REAL_SIZE_NATIVE, parse_real_size

REFERENCE_BATCHES = 3
REFERENCE_BATCH_SIZE = 64
ISC_SPLITS = 10
# torch-fidelity's default seed for shuffling before the Inception Score splits.
ISC_SEED = 2020


def image_paths(manifest_or_folder: str | Path) -> list[Path]:
    """Image paths from a manifest CSV (its ``path`` column) or from a folder of images.

    The manifest is only parsed, not validated as a training manifest: labels, patients and
    cross-patient duplicates do not matter for feature statistics, missing files do.
    """
    source = Path(manifest_or_folder)
    if source.is_dir():
        paths = check_file_names(list_images(source))
    else:
        frame = read_manifest(source)
        paths = [Path(p) for p in frame["abs_path"]]
        missing = [f"line {line}: {p} ({problem})" for line, p in zip(frame["line"], paths) if (problem := not_an_image_file(p)) is not None]
        if missing:
            raise FileNotFoundError(f"{source}: {len(missing)} image(s) not found or not image files: " + "; ".join(missing[:5]))
    if not paths:
        raise DataError(f"{source}: no images")
    return paths


def comparison_size(real_size: str | int, generated_paths: Sequence[str | Path], real_paths: Sequence[str | Path] = ()) -> tuple[int | None, str | None]:
    """The side the real images are resized to before feature extraction (None: as they are), and a note
    when ``"auto"`` could not match the generated images (they do not share one square size) although the
    real images (``real_paths``) differ from them in size."""
    real_size = parse_real_size(real_size)
    if real_size == REAL_SIZE_NATIVE:
        return None, None
    if real_size != REAL_SIZE_AUTO:
        return int(real_size), None
    sizes = {_image_size(p) for p in generated_paths}
    if len(sizes) == 1 and len({*next(iter(sizes))}) == 1:
        return next(iter(sizes))[0], None
    if sizes == {_image_size(p) for p in real_paths}:
        return None, None  # the same sizes on both sides: nothing to match
    shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4]) + (", ..." if len(sizes) > 4 else "")
    return None, f"real images compared at their own size: the generated images do not share one square size ({shown})"


def _image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header where Pillow can read it, else from the decoded image."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # DICOM and other formats Pillow does not open: decode
        height, width = read_grayscale(path).shape[:2]
        return width, height


def printable(path: str | Path) -> str:
    """``path`` as text that can always be printed or written as UTF-8 (undecodable bytes as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def check_file_names(paths: list[Path]) -> list[Path]:
    """``paths``, after refusing a file name that is not valid UTF-8 (it could not be written to a CSV)."""
    for path in paths:
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError as error:
            raise DataError(f"{printable(path)}: file name is not valid UTF-8; rename the file") from error
    return paths


def compute_metrics(
    real_paths: Sequence[str | Path],
    generated_paths: Sequence[str | Path],
    extractor: FeatureExtractor,
    *,
    prc_k: int = PRC_K,
    reference_batches: int = REFERENCE_BATCHES,
    reference_batch_size: int = REFERENCE_BATCH_SIZE,
    isc_splits: int = ISC_SPLITS,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = False,
    real_labels: Sequence[int] | None = None,
    generated_labels: Sequence[int] | None = None,
    real_size: str | int = REAL_SIZE_AUTO,
) -> dict:
    """Embed both image sets with ``extractor`` and score the generated one (see module doc). With both
    ``real_labels`` and ``generated_labels`` (conditioning labels), ``per_class`` adds the metrics of each
    class (:func:`per_class_metrics`) from the same features. ``real_size``: see :func:`comparison_size`."""
    size, size_note = comparison_size(real_size, generated_paths, real_paths)
    real = extractor.extract(real_paths, batch_size, device, cache_dir, progress, size)
    generated = extractor.extract_outputs(generated_paths, batch_size, device, cache_dir, progress)
    options = {
        "extractor_id": extractor.identity,
        "logits_unavailable_reason": extractor.logits_unavailable_reason,
        "prc_k": prc_k,
        "reference_batches": reference_batches,
        "reference_batch_size": reference_batch_size,
        "isc_splits": isc_splits,
        "seed": seed,
    }
    metrics = metrics_from_features(real, generated[FEATURES], generated.get(LOGITS), **options)
    metrics["real_size"] = REAL_SIZE_NATIVE if size is None else size
    if size_note:
        metrics["notes"].append(size_note)
    if real_labels is not None and generated_labels is not None:
        metrics["per_class"] = per_class_metrics(real, real_labels, generated[FEATURES], generated_labels, generated.get(LOGITS), **options)
    return metrics


def metrics_from_features(
    real_features: np.ndarray,
    generated_features: np.ndarray,
    generated_logits: np.ndarray | None = None,
    *,
    extractor_id: str = "",
    logits_unavailable_reason: str | None = None,
    prc_k: int = PRC_K,
    reference_batches: int = REFERENCE_BATCHES,
    reference_batch_size: int = REFERENCE_BATCH_SIZE,
    isc_splits: int = ISC_SPLITS,
    seed: int = 0,
) -> dict:
    """The metrics dict from precomputed features; a metric that cannot be computed is None
    and ``notes`` explains why."""
    real = np.asarray(real_features, dtype=np.float32)
    generated = np.asarray(generated_features, dtype=np.float32)
    notes: list[str] = []
    result = {
        "extractor": extractor_id,
        "num_real": len(real),
        "num_generated": len(generated),
        "fid": _fid(real, generated, notes),
    }
    result.update(_inception_score(generated_logits, logits_unavailable_reason, isc_splits, notes))
    result.update(_precision_recall(real, generated, prc_k, reference_batches, reference_batch_size, seed, notes))
    result["notes"] = notes
    return result


def per_class_metrics(
    real_features: np.ndarray,
    real_labels: Sequence[int],
    generated_features: np.ndarray,
    generated_labels: Sequence[int],
    generated_logits: np.ndarray | None = None,
    **options,
) -> dict[str, dict]:
    """:func:`metrics_from_features` class by class: the class-y samples (by their conditioning label)
    against the class-y real images only. Keys are the labels as text (JSON's), for every class that
    has real or generated images; a class missing on one side has its metrics None with a note."""
    real, generated = np.asarray(real_features, dtype=np.float32), np.asarray(generated_features, dtype=np.float32)
    labels_real, labels_generated = np.asarray(real_labels, dtype=int), np.asarray(generated_labels, dtype=int)
    result = {}
    for label in sorted(set(labels_real.tolist()) | set(labels_generated.tolist())):
        rows, samples = labels_real == label, labels_generated == label
        logits = None if generated_logits is None else np.asarray(generated_logits)[samples]
        result[str(label)] = metrics_from_features(real[rows], generated[samples], logits, **options)
    return result


def _fid(real: np.ndarray, generated: np.ndarray, notes: list[str]) -> float | None:
    if len(real) < 2 or len(generated) < 2:
        notes.append(f"FID needs at least 2 real and 2 generated images (got {len(real)} and {len(generated)})")
        return None
    if min(len(real), len(generated)) <= real.shape[1]:
        return frechet_distance_low_rank(real, generated)
    statistics = [fid_features_to_statistics(torch.from_numpy(f)) for f in (real, generated)]
    return float(fid_statistics_to_metric(*statistics, verbose=False)[KEY_METRIC_FID])


def frechet_distance_low_rank(real: np.ndarray, generated: np.ndarray) -> float:
    """FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), for sets with fewer images than
    feature dimensions.

    torch-fidelity takes tr sqrt(S1 S2) from the eigenvalues of the d x d product (d = 2048 for
    the FID Inception: ~30 s a FID on a 2-core CPU, whatever the number of images). With X1, X2
    the centred (n1, d) and (n2, d) features, S1 S2 = X1' M X2 / ((n1 - 1)(n2 - 1)) with
    M = X1 X2' (n1 x n2), whose nonzero eigenvalues are those of M M' / ((n1 - 1)(n2 - 1)) (AB
    and BA share them), so tr sqrt(S1 S2) is M's nuclear norm / sqrt((n1 - 1)(n2 - 1)): exact,
    and milliseconds for a few hundred images."""
    x1, x2 = np.asarray(real, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    mean1, mean2 = x1.mean(axis=0), x2.mean(axis=0)
    x1, x2 = x1 - mean1, x2 - mean2
    scale1, scale2 = len(x1) - 1, len(x2) - 1
    trace_sqrt = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt(scale1 * scale2)
    difference = mean1 - mean2
    return float(difference @ difference + (x1 * x1).sum() / scale1 + (x2 * x2).sum() / scale2 - 2 * trace_sqrt)


def _inception_score(logits: np.ndarray | None, unavailable_reason: str | None, splits: int, notes: list[str]) -> dict:
    missing = {"inception_score_mean": None, "inception_score_std": None, "inception_score_splits": None}
    if logits is None:
        notes.append(f"Inception Score unavailable: {unavailable_reason or 'no class logits given'}")
        return missing
    if len(logits) == 0:
        notes.append("Inception Score unavailable: no generated images")
        return missing
    used_splits = min(splits, len(logits))
    if used_splits < splits:
        notes.append(f"Inception Score over {used_splits} split(s) instead of {splits}: only {len(logits)} images")
    score = isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits=used_splits, shuffle=True, rng_seed=ISC_SEED)
    return {
        "inception_score_mean": float(score[KEY_METRIC_ISC_MEAN]),
        "inception_score_std": float(score[KEY_METRIC_ISC_STD]),
        "inception_score_splits": used_splits,
    }


def reference_batches(num_real: int, batches: int, batch_size: int, seed: int) -> tuple[list[np.ndarray], str | None]:
    """Disjoint random index batches of the real set for precision/recall, and a note when
    there are too few real images for ``batches`` x ``batch_size``."""
    order = np.random.default_rng(seed).permutation(num_real)
    if num_real >= batches * batch_size:
        used_batches, used_size, note = batches, batch_size, None
    elif num_real >= batch_size:
        used_batches, used_size = num_real // batch_size, batch_size
        note = f"only {num_real} real images: {used_batches} reference batch(es) of {batch_size} instead of {batches}"
    else:
        used_batches, used_size = 1, num_real
        note = f"only {num_real} real images: one reference batch of all of them instead of {batches} x {batch_size}"
    return [order[i * used_size : (i + 1) * used_size] for i in range(used_batches)], note


def _precision_recall(real: np.ndarray, generated: np.ndarray, k: int, batches: int, batch_size: int, seed: int, notes: list[str]) -> dict:
    result = {
        "precision_mean": None,
        "precision_std": None,
        "recall_mean": None,
        "recall_std": None,
        "precision_per_batch": [],
        "recall_per_batch": [],
        "prc_k": k,
        "reference_batches": 0,
        "reference_batch_size": 0,
    }
    if len(generated) <= k:
        notes.append(f"precision/recall need more than k={k} generated images (got {len(generated)})")
        return result
    if len(real) <= k:
        notes.append(f"precision/recall need more than k={k} real images (got {len(real)})")
        return result
    indices, note = reference_batches(len(real), batches, batch_size, seed)
    if note:
        notes.append(note)
    scores = [improved_precision_recall(real[batch], generated, k=k) for batch in indices]
    precision = [s["precision"] for s in scores]
    recall = [s["recall"] for s in scores]
    result.update(
        precision_mean=float(np.mean(precision)),
        precision_std=float(np.std(precision)),
        recall_mean=float(np.mean(recall)),
        recall_std=float(np.std(recall)),
        precision_per_batch=precision,
        recall_per_batch=recall,
        reference_batches=len(indices),
        reference_batch_size=len(indices[0]),
    )
    return result


def save_metrics(metrics: dict, path: str | Path) -> Path:
    """Write the metrics dict as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def _mean_std(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "unavailable"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def format_per_class_table(per_class: dict[str, dict]) -> str:
    """One row per class: images, FID, precision and recall of the class-y samples against the class-y real images."""
    header = ("class", "real", "generated", "FID", "precision", "recall")
    rows = [
        (
            label,
            str(m["num_real"]),
            str(m["num_generated"]),
            "unavailable" if m["fid"] is None else f"{m['fid']:.2f}",
            _mean_std(m["precision_mean"], m["precision_std"], 4),
            _mean_std(m["recall_mean"], m["recall_std"], 4),
        )
        for label, m in per_class.items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines += [f"note (class {label}): {note}" for label, m in per_class.items() for note in m.get("notes", [])]
    return "\n".join(lines)


def format_metrics_table(metrics: dict) -> str:
    """A plain-text table of the metrics dict, followed by its notes (and the per-class table, when computed)."""
    fid = metrics.get("fid")
    protocol = f"k={metrics.get('prc_k')}, {metrics.get('reference_batches')} x {metrics.get('reference_batch_size')} real"
    rows = [
        ("images (real / generated)", f"{metrics.get('num_real')} / {metrics.get('num_generated')}"),
        ("FID", "unavailable" if fid is None else f"{fid:.2f}"),
        ("Inception Score", _mean_std(metrics.get("inception_score_mean"), metrics.get("inception_score_std"), 3)),
        (f"precision ({protocol})", _mean_std(metrics.get("precision_mean"), metrics.get("precision_std"), 4)),
        (f"recall ({protocol})", _mean_std(metrics.get("recall_mean"), metrics.get("recall_std"), 4)),
    ]
    if metrics.get("real_size") is not None:
        size = metrics["real_size"]
        rows.insert(0, ("real images compared at", "their own size" if size == REAL_SIZE_NATIVE else f"{size} x {size} px"))
    if metrics.get("extractor"):
        rows.insert(0, ("extractor", metrics["extractor"]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"note: {note}" for note in metrics.get("notes", [])]
    if metrics.get("per_class"):
        lines += ["", "per class (class-y samples against class-y real images):", format_per_class_table(metrics["per_class"])]
    return "\n".join(lines)
