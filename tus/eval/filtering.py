"""The k-NN manifold filter for generated images (TesticulUS Algorithm 1) and its k sweep.

:func:`filter_generated` keeps the generated images whose features fall inside the real
manifold (union of balls around the real features, radius = distance to the k-th nearest
other real feature; k = 50 in the reference, for the ~880 real images it used, and k should
grow roughly linearly with the number of real images). It writes into a new folder::

    out_dir/images/      kept images, hard-linked (copied across filesystems) or copied
    out_dir/filter.csv   every generated image: path, decision (kept/rejected), min_distance_ratio
    out_dir/manifest.csv the kept images: path (relative), sample_id, organ (if given)
    out_dir/filter.json  settings and counts

Per class (``per_class=True``, ``tus filter --per-class``): a class-``y`` sample is kept when it
falls in the class-``y`` real manifold (balls around the class-``y`` real features only, k-th
neighbour within the class). The real images' labels come from the ``label`` column of the real
manifest, the samples' from ``manifest.csv`` in the generated folder (what ``tus sample --label``
writes); filter.csv and the kept images' manifest then carry ``label``.

The real images are resized to the generated images' size before their features are taken (``real_size``,
see :func:`tus.eval.metrics.comparison_size`): the manifold is that of the real images as the generator saw
them. filter.json records the size.

The generated folder is only read. Hard links share the file with the input, so edit kept
images only after copying them (``link="copy"`` avoids the question).

:func:`sweep` reports FID, IS, precision and recall of the kept set and the kept/rejected
counts for several k (as in the thesis's Fig. 4.4) plus a grid of kept and rejected samples
(Fig. 4.5).
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from tus.data.images import DataError, OutputExistsError, UsageError, list_images, read_grayscale
from tus.data.manifest import read_manifest
from tus.data.outputs import staged_folder
from tus.data.synthetic import GENERATOR_FILE
from tus.eval.features import FEATURES, LOGITS, FeatureExtractor, InceptionExtractor
from tus.eval.manifold import kth_neighbour_radii, manifold_membership
from tus.eval.metrics import (
    PRC_K,
    REFERENCE_BATCH_SIZE,
    REFERENCE_BATCHES,
    check_file_names,
    comparison_size,
    image_paths,
    metrics_from_features,
    save_metrics,
)
from tus.eval.options import FILTER_K as FILTER_K
from tus.eval.options import LINK_MODES as LINK_MODES
from tus.eval.options import REAL_SIZE_AUTO, REAL_SIZE_NATIVE

SWEEP_KS = (10, 20, 50, 100)
KEPT, REJECTED = "kept", "rejected"


@dataclass(frozen=True)
class FilterResult:
    """Outcome of :func:`filter_generated`; ``table`` is the content of filter.csv."""

    out_dir: Path
    table: pd.DataFrame

    @property
    def kept(self) -> int:
        return int((self.table["decision"] == KEPT).sum())

    @property
    def rejected(self) -> int:
        return int((self.table["decision"] == REJECTED).sum())


def _check_new_folder(out_dir: Path, generated_dir: Path) -> None:
    """Refuse an output folder that holds anything, or that lies in the generated folder."""
    out, source = out_dir.resolve(), generated_dir.resolve()
    if out == source or source in out.parents:
        raise UsageError(f"{out_dir}: the output folder must not be inside the generated folder {generated_dir}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(f"--out {out_dir}: exists and is not empty; the filter writes only into a new folder")


def _generated_images(generated_dir: Path) -> list[Path]:
    paths = check_file_names(list_images(generated_dir))
    if not paths:
        raise DataError(f"{generated_dir}: no generated images in this folder")
    return paths


def _check_k(k: int, num_real: int) -> None:
    """Fail before any feature is computed when k leaves no k-th neighbour."""
    if not 1 <= k < num_real:
        raise UsageError(f"k must be between 1 and the number of real images - 1 ({num_real - 1}), got {k}")


def _labels_column(frame: pd.DataFrame, where: str) -> np.ndarray:
    if "label" not in frame.columns:
        raise DataError(f"{where}: no 'label' column; the per-class filter needs labelled real images and samples (tus sample --label)")
    labels = []
    for line, text in zip(frame["line"] if "line" in frame.columns else range(2, len(frame) + 2), frame["label"]):
        try:
            labels.append(int(str(text).strip()))
        except ValueError:
            raise DataError(f"{where}: line {line}: label {text!r} is not an integer") from None
    return np.asarray(labels, dtype=int)


def real_labels(real: str | Path) -> np.ndarray:
    """The class label of each real image, in :func:`image_paths` order (the real set must be a manifest)."""
    if Path(real).is_dir():
        raise UsageError(f"{real}: the per-class filter needs the real images as a labelled manifest, not a folder")
    return _labels_column(read_manifest(real), str(real))


def generated_labels(generated_dir: str | Path, generated: Sequence[Path]) -> np.ndarray:
    """The conditioning label of each generated image, from the folder's ``manifest.csv`` (matched by file name)."""
    manifest = Path(generated_dir) / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"{manifest}: not found; the per-class filter reads the samples' labels from it (tus sample --label writes it)")
    frame = read_manifest(manifest)
    by_name = dict(zip((Path(p).name for p in frame["abs_path"]), _labels_column(frame, str(manifest)).tolist()))
    missing = [p.name for p in generated if p.name not in by_name]
    if missing:
        raise DataError(f"{manifest}: no row for {len(missing)} generated image(s), e.g. {missing[0]}")
    return np.asarray([by_name[p.name] for p in generated], dtype=int)


def _check_per_class_k(k: int, labels_real: np.ndarray, labels_generated: np.ndarray) -> None:
    counts = dict(zip(*np.unique(labels_real, return_counts=True)))
    for label in sorted(set(labels_generated.tolist())):
        if counts.get(label, 0) <= k:
            raise UsageError(f"class {label}: {counts.get(label, 0)} real image(s), but the per-class filter needs more than k={k} (lower --k)")


def per_class_membership(
    real: np.ndarray,
    labels_real: np.ndarray,
    generated: np.ndarray,
    labels_generated: np.ndarray,
    k: int,
    block_size: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`manifold_membership` class by class: generated point j is judged against the real points of its own
    class ``labels_generated[j]`` only (radii = k-th neighbour within that class). Returns (inside, min_ratio)."""
    labels_real, labels_generated = np.asarray(labels_real), np.asarray(labels_generated)
    _check_per_class_k(k, labels_real, labels_generated)
    inside = np.zeros(len(labels_generated), dtype=bool)
    ratios = np.full(len(labels_generated), np.inf, dtype=np.float32)
    for label in sorted(set(labels_generated.tolist())):
        rows, queries = labels_real == label, labels_generated == label
        class_real = np.asarray(real)[rows]
        radii = kth_neighbour_radii(class_real, k, block_size)
        inside[queries], ratios[queries] = manifold_membership(class_real, radii, np.asarray(generated)[queries], block_size, progress)
    return inside, ratios


def check_filter_arguments(real: str | Path, generated_dir: str | Path, out_dir: str | Path, k: int, sweep_ks: Sequence[int] | None = None, per_class: bool = False) -> None:
    """Every check of ``tus filter`` that needs no feature: the output folder, the generated images, k and
    the swept ks (and, per class, both sets' labels). Run first, so a mistake costs no feature extraction."""
    generated_dir, out_dir = Path(generated_dir), Path(out_dir)
    _check_new_folder(out_dir, generated_dir)
    generated = _generated_images(generated_dir)
    num_real = len(image_paths(real))
    _check_k(k, num_real)
    if per_class:
        _check_per_class_k(k, real_labels(real), generated_labels(generated_dir, generated))
    if sweep_ks is not None:
        if not sweep_ks:
            raise UsageError("--sweep must name at least one k, e.g. 10,20,50,100")
        for swept in sweep_ks:
            try:
                _check_k(swept, num_real)
            except UsageError as error:
                raise UsageError(f"--sweep: {error}") from error


def _link_or_copy(source: Path, target: Path, link: str) -> None:
    if link == "hardlink":
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another filesystem, or one without hard links: copy instead
    shutil.copy2(source, target)


def filter_generated(
    real: str | Path,
    generated_dir: str | Path,
    out_dir: str | Path,
    *,
    k: int = FILTER_K,
    link: str = "hardlink",
    extractor: FeatureExtractor | None = None,
    cache_dir: str | Path | None = None,
    organ: str | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    block_size: int | None = None,
    progress: bool = False,
    per_class: bool = False,
    real_size: str | int = REAL_SIZE_AUTO,
) -> FilterResult:
    """Keep the images of ``generated_dir`` inside the manifold of ``real`` (manifest or folder).

    ``extractor`` defaults to the FID Inception-v3 (:class:`InceptionExtractor`). The output is written into
    a hidden sibling folder and renamed to ``out_dir`` only when complete, so a failure leaves no half-written
    output.
    """
    if link not in LINK_MODES:
        raise UsageError(f"link must be one of {LINK_MODES}, got {link!r}")
    generated_dir, out_dir = Path(generated_dir), Path(out_dir)
    _check_new_folder(out_dir, generated_dir)
    generated = _generated_images(generated_dir)
    real_paths = image_paths(real)
    _check_k(k, len(real_paths))
    labels = None
    if per_class:
        labels, labels_real = generated_labels(generated_dir, generated), real_labels(real)
        _check_per_class_k(k, labels_real, labels)
    extractor = extractor or InceptionExtractor()
    size, size_note = comparison_size(real_size, generated, real_paths)
    real_features = extractor.extract(real_paths, batch_size, device, cache_dir, progress, size)
    generated_features = extractor.extract(generated, batch_size, device, cache_dir, progress)
    if labels is not None:
        inside, ratios = per_class_membership(real_features, labels_real, generated_features, labels, k, block_size, progress)
    else:
        radii = kth_neighbour_radii(real_features, k, block_size)
        inside, ratios = manifold_membership(real_features, radii, generated_features, block_size, progress)

    kept = [path for path, keep in zip(generated, inside) if keep]
    table = pd.DataFrame(
        {
            "path": [str(p.resolve()) for p in generated],
            "decision": np.where(inside, KEPT, REJECTED),
            "min_distance_ratio": ratios,
        }
    )
    manifest = pd.DataFrame({"path": [f"images/{p.name}" for p in kept], "sample_id": [p.name for p in kept]})
    if organ is not None:
        manifest["organ"] = organ
    if labels is not None:
        table["label"] = labels
        manifest["label"] = labels[inside]
    summary = {
        "real": str(real),
        "generated_dir": str(generated_dir),
        "k": k,
        "extractor": extractor.identity,
        "real_size": REAL_SIZE_NATIVE if size is None else size,
        "num_real": len(real_paths),
        "num_generated": len(generated),
        "kept": len(kept),
        "rejected": len(generated) - len(kept),
        "link": link,
    }
    if size_note:
        summary["notes"] = [size_note]
    if labels is not None:
        summary["per_class"] = {str(label): {"generated": int((labels == label).sum()), "kept": int(inside[labels == label].sum())} for label in sorted(set(labels.tolist()))}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(out_dir) as staging:
        (staging / "images").mkdir()
        for path in kept:
            _link_or_copy(path, staging / "images" / path.name, link)
        table.to_csv(staging / "filter.csv", index=False)
        manifest.to_csv(staging / "manifest.csv", index=False)
        (staging / "filter.json").write_text(json.dumps(summary, indent=2) + "\n")
        if (generated_dir / GENERATOR_FILE).is_file():  # which patients the generator never saw travels with the kept samples
            shutil.copy2(generated_dir / GENERATOR_FILE, staging / GENERATOR_FILE)
    return FilterResult(out_dir=out_dir, table=table)


def sweep(
    real: str | Path,
    generated_dir: str | Path,
    out_dir: str | Path,
    *,
    ks: Sequence[int] = SWEEP_KS,
    highlight_k: int = FILTER_K,
    extractor: FeatureExtractor | None = None,
    cache_dir: str | Path | None = None,
    prc_k: int = PRC_K,
    reference_batches: int = REFERENCE_BATCHES,
    reference_batch_size: int = REFERENCE_BATCH_SIZE,
    seed: int = 0,
    samples_per_row: int = 8,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    block_size: int | None = None,
    progress: bool = False,
    real_size: str | int = REAL_SIZE_AUTO,
) -> dict:
    """Metrics of the kept set and kept/rejected counts for every k in ``ks``.

    Writes ``sweep.json``, ``sweep.png`` (metrics against k, the unfiltered set as a dotted
    line, ``highlight_k`` dashed) and ``samples.png`` (kept images framed green, rejected red,
    at the swept k nearest ``highlight_k``) into the new folder ``out_dir``; returns the JSON.
    """
    generated_dir, out_dir = Path(generated_dir), Path(out_dir)
    _check_new_folder(out_dir, generated_dir)
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise UsageError("ks must name at least one k")
    generated = _generated_images(generated_dir)
    real_paths = image_paths(real)
    for k in (ks[0], ks[-1]):
        _check_k(k, len(real_paths))
    extractor = extractor or InceptionExtractor()
    size, size_note = comparison_size(real_size, generated, real_paths)
    real_features = extractor.extract(real_paths, batch_size, device, cache_dir, progress, size)
    outputs = extractor.extract_outputs(generated, batch_size, device, cache_dir, progress)
    features, logits = outputs[FEATURES], outputs.get(LOGITS)

    def score(mask: np.ndarray) -> dict:
        return metrics_from_features(
            real_features,
            features[mask],
            None if logits is None else logits[mask],
            extractor_id=extractor.identity,
            logits_unavailable_reason=extractor.logits_unavailable_reason,
            prc_k=prc_k,
            reference_batches=reference_batches,
            reference_batch_size=reference_batch_size,
            seed=seed,
        )

    everything = np.ones(len(generated), dtype=bool)
    rows, ratios_by_k = [], {}
    for k in ks:
        radii = kth_neighbour_radii(real_features, k, block_size)
        inside, ratios = manifold_membership(real_features, radii, features, block_size, progress)
        ratios_by_k[k] = ratios
        rows.append({"k": k, "kept": int(inside.sum()), "rejected": int((~inside).sum()), **score(inside)})
    report = {
        "real": str(real),
        "generated_dir": str(generated_dir),
        "highlight_k": highlight_k,
        "real_size": REAL_SIZE_NATIVE if size is None else size,
        "notes": [size_note] if size_note else [],
        "unfiltered": {"kept": len(generated), "rejected": 0, **score(everything)},
        "sweep": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_metrics(report, out_dir / "sweep.json")
    _plot_sweep(report, out_dir / "sweep.png")
    shown_k = min(ks, key=lambda k: abs(k - highlight_k))
    _plot_samples(generated, ratios_by_k[shown_k], shown_k, samples_per_row, seed, out_dir / "samples.png")
    return report


# (metric key, its std key, panel title); the title's first word names the metric in notes.
SWEEP_PANELS = (
    ("fid", None, "FID (lower is better)"),
    ("inception_score_mean", "inception_score_std", "Inception Score"),
    ("precision_mean", "precision_std", "precision (k={prc_k})"),
    ("recall_mean", "recall_std", "recall (k={prc_k})"),
)


def _plot_sweep(report: dict, path: Path) -> None:
    rows = report["sweep"]
    ks = [row["k"] for row in rows]
    figure = Figure(figsize=(17, 3.4), layout="constrained")
    axes = figure.subplots(1, len(SWEEP_PANELS) + 1)
    for ax, (key, std_key, title) in zip(axes, SWEEP_PANELS):
        title = title.format(prc_k=rows[0]["prc_k"])
        ax.set_title(title, fontsize=9)
        points = [(row["k"], row[key], row[std_key] if std_key else None) for row in rows if row[key] is not None]
        if not points:
            metric = title.split(" (")[0]
            reason = next((n for n in report["unfiltered"]["notes"] if metric in n), "not computed")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, textwrap.fill(reason, 34), ha="center", va="center", fontsize=7, transform=ax.transAxes)
            continue
        errors = [error or 0.0 for _, _, error in points] if std_key else None
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=errors, marker="o", capsize=3)
        baseline = report["unfiltered"][key]
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle=":", label="unfiltered")
            ax.legend(fontsize=7)
        ax.set_xlabel("filter k")
    counts = axes[-1]
    counts.plot(ks, [row["kept"] for row in rows], marker="o", color="tab:green", label="kept")
    counts.plot(ks, [row["rejected"] for row in rows], marker="o", color="tab:red", label="rejected")
    counts.set_title("generated images", fontsize=9)
    counts.set_xlabel("filter k")
    counts.legend(fontsize=7)
    for ax in axes:
        if ax.has_data():
            ax.axvline(report["highlight_k"], color="black", linestyle="--", linewidth=0.8)
    figure.savefig(path, dpi=120)


def _plot_samples(paths: list[Path], ratios: np.ndarray, k: int, per_row: int, seed: int, path: Path) -> None:
    """Two rows of random samples: kept (green frame) above rejected (red frame)."""
    rng = np.random.default_rng(seed)
    groups = []
    for inside, colour in ((True, "tab:green"), (False, "tab:red")):
        candidates = np.flatnonzero((ratios <= 1.0) == inside)
        chosen = rng.choice(candidates, size=min(per_row, len(candidates)), replace=False) if len(candidates) else []
        groups.append((sorted(chosen), colour))
    columns = max(1, per_row)
    figure = Figure(figsize=(1.6 * columns, 3.8), layout="constrained")
    axes = figure.subplots(2, columns, squeeze=False)
    for row, (label, (chosen, colour)) in enumerate(zip((KEPT, REJECTED), groups)):
        for column in range(columns):
            ax = axes[row][column]
            ax.set_xticks([])
            ax.set_yticks([])
            if column >= len(chosen):
                ax.set_axis_off()
                continue
            index = chosen[column]
            ax.imshow(read_grayscale(paths[index]), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"ratio {ratios[index]:.2f}", fontsize=7)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
        axes[row][0].set_ylabel(label, fontsize=9)
    figure.suptitle(f"kept (green) and rejected (red) generated images, k = {k}", fontsize=9)
    figure.savefig(path, dpi=120)
