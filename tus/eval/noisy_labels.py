"""Noisy-label flagging from per-sample loss trajectories (TesticulUS Sec. 3, thesis Sec. 3.2).

A sample is *suspicious in a run* when its training loss exceeds ``threshold`` (1.0) in at
least ``min_exceed`` (3) epochs of that run. A weighted sampler draws a sample several times
in an epoch, or not at all, so the recorded losses (one per draw) are first averaged per
(run, epoch, sample), as the reference does (thesis Fig. 3.2: one point per epoch; "samples
may span different numbers of epochs due to the weighted sampler"). Counting every draw
(``counting: per_draw``) gives the minority class, drawn more often, more chances to be
flagged; it stays available as an explicit option. Its *evaluations* are the runs
in which it was trained on (drawn at least once); it is *flagged* when it is suspicious in at
least ``min_fraction`` of its evaluations (1.0 = all, as in the reference: 72 of 880 images,
each evaluated 16 times = 2 inits x 4 seeds x 2 training folds of 3).

``tus noisy-labels RUN_DIRS... --out DIR`` reads ``runs/*/losses.csv`` of finished CV run
dirs (written by :class:`tus.callbacks.loss_recorder.PerSampleLossRecorder`) and writes into
a new folder: ``flag_counts.csv`` (every sample), ``flagged.csv``, the flag-count histogram
for ``min_exceed`` 1, 3, 5 (thesis Fig. 3.3, ``flag_histogram.png/.csv``), loss trajectories of
the most and least suspicious samples (Fig. 3.2, ``loss_trajectories.png``),
``manifest_filtered.csv`` (flagged rows removed), ``manifest_flipped.csv`` (flagged labels
flipped) and ``report.json`` (with flagging precision/recall when the manifest has a
``clean_label`` column). The input manifest is never modified.

A study with a ``noisy_labels:`` block (``tus experiment run studies/tab1``) runs the whole
protocol: the flagging CVs (one per initialisation), the flagging, then its arms on the
complete, filtered and flipped data, with the reference or the fold-safe protocol.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tus.data.manifest import LABEL_NAMES_ATTR, load_manifest, read_manifest, write_manifest
from tus.eval.cv_metrics import PROBABILITY_PREFIX

HISTOGRAM_MIN_EXCEED = (1, 3, 5)
REQUIRED_LOSS_COLUMNS = ("sample_id", "step", "label", "loss")
COUNTINGS = ("per_epoch", "per_draw")
Counting = Literal["per_epoch", "per_draw"]


@dataclass(frozen=True)
class FlaggingRule:
    """Loss > ``threshold`` in >= ``min_exceed`` points of a run, in >= ``min_fraction`` of runs.

    ``counting``: a point is an epoch (the sample's mean loss in it; the reference) or every
    recorded draw (``per_draw``, tus <= 0.1).
    """

    threshold: float = 1.0
    min_exceed: int = 3
    min_fraction: float = 1.0
    counting: Counting = "per_epoch"

    def __post_init__(self) -> None:
        if self.min_exceed < 1 or not 0 < self.min_fraction <= 1:
            raise ValueError(f"need min_exceed >= 1 and 0 < min_fraction <= 1, got {self.min_exceed}, {self.min_fraction}")
        if self.counting not in COUNTINGS:
            raise ValueError(f"counting must be one of {', '.join(COUNTINGS)}, got {self.counting!r}")


class LossTableError(ValueError):
    """Recorded losses are missing, unfinished, malformed or do not match the manifest."""


def find_loss_tables(run_dirs: Sequence[str | Path]) -> list[Path]:
    """``losses.csv`` of every finished run under the given CV run dirs (or single runs)."""
    tables = []
    for run_dir in map(Path, run_dirs):
        found = [run_dir / "losses.csv"] if (run_dir / "losses.csv").is_file() else sorted(run_dir.glob("runs/*/losses.csv"))
        if not found:
            raise LossTableError(f"{run_dir}: no losses.csv and no runs/*/losses.csv; fine-tune with record_losses: true")
        for table in found:
            if not (table.parent / "metrics.json").is_file():
                raise LossTableError(f"{table.parent}: run not finished (no metrics.json); resume it with tus finetune-cv --run-dir, or leave it out")
        tables += found
    return tables


def read_losses(tables: list[Path]) -> pd.DataFrame:
    """All recorded rows, with ``run`` naming the run directory each came from."""
    frames = []
    for table in tables:
        frame = pd.read_csv(table, dtype={"sample_id": str})
        missing = [c for c in REQUIRED_LOSS_COLUMNS if c not in frame.columns]
        if missing:
            raise LossTableError(f"{table}: missing column(s) {missing} (found {list(frame.columns)})")
        frames.append(frame.assign(run=str(table.parent)))
    return pd.concat(frames, ignore_index=True)


def epoch_means(losses: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, epoch, sample): the mean loss over the sample's draws in that epoch.

    ``draws`` counts them; ``step`` is the first step the sample was drawn in that epoch.
    Tables without an ``epoch`` column (no tus version wrote one) cannot be averaged per
    epoch: the number of steps per epoch is not recorded, so it is not guessed.
    """
    if "epoch" not in losses.columns:
        raise LossTableError("the loss table has no 'epoch' column, so losses cannot be averaged per epoch; re-record it with PerSampleLossRecorder, or count every draw (counting: per_draw)")
    return losses.groupby(["run", "epoch", "sample_id"], sort=True).agg(label=("label", "first"), step=("step", "min"), draws=("loss", "size"), loss=("loss", "mean")).reset_index()


def counted_points(losses: pd.DataFrame, counting: Counting = "per_epoch") -> pd.DataFrame:
    """The loss points a rule counts: per-epoch means, or the recorded draws as they are."""
    if counting not in COUNTINGS:
        raise ValueError(f"counting must be one of {', '.join(COUNTINGS)}, got {counting!r}")
    return epoch_means(losses) if counting == "per_epoch" else losses


def exceedances(losses: pd.DataFrame, threshold: float, counting: Counting = "per_epoch") -> pd.DataFrame:
    """Per (run, sample): counted points (epochs or draws) and how many had loss > ``threshold``."""
    points = counted_points(losses, counting)
    return points.assign(exceeded=points["loss"] > threshold).groupby(["run", "sample_id"], sort=True).agg(occurrences=("loss", "size"), exceedances=("exceeded", "sum")).reset_index()


def flag_counts(per_run: pd.DataFrame, min_exceed: int) -> pd.DataFrame:
    """Per sample: ``evaluations`` (runs it was trained in) and ``flagged_in`` (runs suspicious)."""
    return (
        per_run.assign(suspicious=per_run["exceedances"] >= min_exceed)
        .groupby("sample_id", sort=True)
        .agg(evaluations=("run", "size"), flagged_in=("suspicious", "sum"), exceedances=("exceedances", "sum"))
    )


def flag_samples(losses: pd.DataFrame, rule: FlaggingRule) -> pd.DataFrame:
    """:func:`flag_counts` plus ``flagged``: suspicious in >= ``min_fraction`` of evaluations."""
    counts = flag_counts(exceedances(losses, rule.threshold, rule.counting), rule.min_exceed)
    needed = np.ceil(rule.min_fraction * counts["evaluations"] - 1e-9)
    counts["flagged"] = (counts["evaluations"] > 0) & (counts["flagged_in"] >= needed)
    return counts


def check_against_manifest(losses: pd.DataFrame, manifest: pd.DataFrame, manifest_path: Path) -> None:
    """Every recorded sample must be in the manifest with the label it was trained with."""
    labels = manifest.set_index("sample_id")["label"]
    unknown = sorted(set(losses["sample_id"]) - set(labels.index))
    if unknown:
        raise LossTableError(f"{manifest_path}: {len(unknown)} recorded sample id(s) are not in this manifest, e.g. {unknown[:3]}; give the manifest the runs were trained on")
    trained = losses.groupby("sample_id")["label"].first()
    differs = trained[trained != labels.loc[trained.index]]
    if len(differs):
        raise LossTableError(f"{manifest_path}: {len(differs)} sample(s) were trained with another label than this manifest's, e.g. {differs.index[0]!r}; give the manifest the runs were trained on")


def histogram(losses: pd.DataFrame, threshold: float, min_exceeds=HISTOGRAM_MIN_EXCEED, counting: Counting = "per_epoch") -> pd.DataFrame:
    """Samples per flag count, for each ``min_exceed`` (thesis Fig. 3.3)."""
    per_run = exceedances(losses, threshold, counting)
    rows = []
    for min_exceed in min_exceeds:
        counts = flag_counts(per_run, min_exceed)["flagged_in"].value_counts()
        for flagged_in in range(int(per_run.groupby("sample_id").size().max()) + 1):
            rows.append({"min_exceed": min_exceed, "flagged_in": flagged_in, "samples": int(counts.get(flagged_in, 0))})
    return pd.DataFrame(rows)


def plot_histogram(table: pd.DataFrame, threshold: float, path: Path, min_exceed: int | None = None) -> None:
    """One panel per ``min_exceed`` of :func:`histogram`; the configured rule's panel (``min_exceed``)
    is drawn in colour and titled so, the others in grey."""
    import matplotlib

    from tus.figures.style import METADATA, RC, colors

    min_exceeds = sorted(table["min_exceed"].unique())
    highlight = colors(2)[0]
    with matplotlib.rc_context(RC):
        figure = Figure(figsize=(2.2 * len(min_exceeds), 2.4), layout="constrained")
        axes = figure.subplots(1, len(min_exceeds), squeeze=False, sharey=True)[0]
        for axis, value in zip(axes, min_exceeds):
            rows = table[table["min_exceed"] == value]
            configured = value == min_exceed
            bars = axis.bar(rows["flagged_in"], rows["samples"], color=highlight if configured else "0.65", edgecolor="black" if configured else "none", linewidth=0.6)
            axis.bar_label(bars, fontsize=5)
            axis.set_xticks(rows["flagged_in"])
            axis.set_title(f"loss > {threshold:g} in ≥ {value} epochs" + (" (configured rule)" if configured else ""), fontweight="bold" if configured else "normal")
            axis.set_xlabel("runs in which suspicious")
        axes[0].set_ylabel("samples")
    figure.savefig(path, dpi=150, metadata=METADATA["png"])


def plot_trajectories(losses: pd.DataFrame, flags: pd.DataFrame, threshold: float, path: Path, count: int = 5) -> None:
    """Per-epoch mean loss of the ``count`` most and least suspicious samples (thesis Fig. 3.2).

    Each sample is drawn from the first run in which it was trained; a weighted sampler
    skips samples in some epochs, so samples have different numbers of points. Without an
    ``epoch`` column (per-draw counting of an old table) every draw is a point over steps.
    Flagged samples are drawn bold in colour, the others thin and grey; the threshold is a
    labelled dashed line, and the legend sits below the panels where it hides no curve.
    """
    import matplotlib

    from tus.figures.style import METADATA, RC, colors

    per_epoch = "epoch" in losses.columns
    points = epoch_means(losses) if per_epoch else losses
    x_column = "epoch" if per_epoch else "step"
    evaluated = flags[flags["evaluations"] > 0].assign(share=lambda f: f["flagged_in"] / f["evaluations"])
    ranked = evaluated.sort_values(["share", "exceedances"], ascending=False, kind="stable")
    groups = (("most suspicious", ranked.index[:count]), ("least suspicious", ranked.index[::-1][:count]))
    flagged = set(flags.index[flags["flagged"].astype(bool)]) if "flagged" in flags else set()
    palette = colors(count)
    with matplotlib.rc_context(RC):
        figure = Figure(figsize=(7.0, 3.0), layout="constrained")
        axes = figure.subplots(1, 2, sharey=True)
        for axis, (title, samples) in zip(axes, groups):
            for index, sample in enumerate(samples):
                rows = points[points["sample_id"] == sample]
                rows = rows[rows["run"] == rows["run"].iloc[0]].sort_values(x_column)
                is_flagged = sample in flagged
                axis.plot(
                    rows[x_column],
                    rows["loss"],
                    marker="o" if is_flagged else ".",
                    markersize=3 if is_flagged else 2,
                    linewidth=1.6 if is_flagged else 0.7,
                    color=palette[index % len(palette)] if is_flagged else "0.6",
                    zorder=3 if is_flagged else 2,
                    label=_short(sample) + (" (flagged)" if is_flagged else ""),
                )
            axis.axhline(threshold, color="black", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
            axis.set_title(title)
            axis.set_xlabel("epoch" if per_epoch else "training step")
            axis.legend(fontsize=5, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=2, frameon=False)
        axes[0].set_ylabel("per-sample loss, epoch mean (nats)" if per_epoch else "per-sample loss (nats)")
    figure.savefig(path, dpi=150, metadata=METADATA["png"])


def _short(sample_id: str, width: int = 28) -> str:
    return sample_id if len(sample_id) <= width else "..." + sample_id[-width + 3 :]


def flagging_quality(manifest: pd.DataFrame, flagged: pd.Series) -> dict:
    """Precision/recall of flagging against the known-clean labels of a noisy phantom."""
    noisy = (manifest["label"] != manifest["clean_label"].astype(int)).to_numpy()
    hit = flagged.to_numpy() & noisy
    return {
        "noisy_samples": int(noisy.sum()),
        "flagged_noisy": int(hit.sum()),
        "precision": float(hit.sum() / flagged.sum()) if flagged.sum() else float("nan"),
        "recall": float(hit.sum() / noisy.sum()) if noisy.sum() else float("nan"),
    }


def run_label_names(runs: Sequence[str]) -> list[str] | None:
    """``data.label_names`` of the CV that the run folders ``runs`` (``<cv>/runs/<run>``) belong to, if recorded."""
    import yaml

    for run in runs:
        config = Path(run).parent.parent / "config.yaml"
        if config.is_file():
            names = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("label_names")
            if names:
                return list(names)
    return None


def out_of_fold_probabilities(runs: Sequence[str]) -> pd.DataFrame:
    """Each sample's class probabilities averaged over the runs' test predictions (``predictions.csv``
    beside each run's ``losses.csv``: a model that never trained on the sample), indexed by sample_id."""
    tables = [pd.read_csv(Path(run) / "predictions.csv", dtype={"sample_id": str}) for run in runs if (Path(run) / "predictions.csv").is_file()]
    if not tables:
        return pd.DataFrame()
    pooled = pd.concat(tables, ignore_index=True)
    columns = [c for c in pooled.columns if c.startswith(PROBABILITY_PREFIX)]
    return pooled.groupby("sample_id")[columns].mean()


def relabel_to_most_probable_other(labels: pd.Series, sample_ids: pd.Series, probabilities: pd.DataFrame) -> np.ndarray:
    """The flip of K > 2 classes: each sample's new label is the class other than its own that the
    models find most probable (``probabilities``: one ``prob_<class>`` column per class, in class
    order, by sample_id; ties go to the lower class index). Binary, this is ``1 - label``."""
    missing = sorted(set(sample_ids) - set(probabilities.index))
    if missing:
        raise LossTableError(f"no out-of-fold class probabilities (runs' predictions.csv) for {len(missing)} flagged sample(s), e.g. {missing[0]!r}; cannot relabel them")
    table = probabilities.loc[list(sample_ids)].to_numpy(dtype=float).copy()
    table[np.arange(len(table)), np.asarray(labels, dtype=int)] = -np.inf
    return table.argmax(axis=1)


def _labels_are_names(manifest_path: Path) -> bool:
    labels = [text.strip() for text in read_manifest(manifest_path)["label"] if text.strip()]
    return bool(labels) and not any(text.lstrip("-").replace(".", "", 1).isdigit() for text in labels)


def write_report(losses: pd.DataFrame, manifest_path: str | Path, rule: FlaggingRule, out_dir: str | Path, histogram_min_exceed=HISTOGRAM_MIN_EXCEED, label_names: Sequence[str] | None = None) -> dict:
    """Flag, and write the report, ``flagged.csv`` and the two new manifests into ``out_dir``.

    ``label_names`` (default: the runs' ``data.label_names``): with K > 2 classes a flagged label is
    not flipped but relabelled to the most probable other class (:func:`relabel_to_most_probable_other`)."""
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    runs = sorted(losses["run"].unique().tolist())
    label_names = list(label_names) if label_names else run_label_names(runs)
    manifest = load_manifest(manifest_path, require_labels=True, decode_images=False, label_names=label_names)
    check_against_manifest(losses, manifest, manifest_path)
    out_dir.mkdir(parents=True, exist_ok=False)

    flags = flag_samples(losses, rule).reindex(manifest["sample_id"])
    flags = flags.fillna({"evaluations": 0, "flagged_in": 0, "exceedances": 0, "flagged": False}).astype({"evaluations": int, "flagged_in": int, "exceedances": int, "flagged": bool})
    flagged = pd.Series(flags["flagged"].to_numpy(), index=manifest.index)
    table = manifest[["sample_id", "label"]].assign(path=manifest["abs_path"], **{c: flags[c].to_numpy() for c in ("flagged_in", "evaluations", "exceedances", "flagged")})
    if "clean_label" in manifest.columns:
        table["clean_label"] = manifest["clean_label"].astype(int)
    table.to_csv(out_dir / "flag_counts.csv", index=False)
    columns = ["sample_id", "path", "label", "flagged_in", "evaluations", *(["clean_label"] if "clean_label" in table else [])]
    table.loc[flagged, columns].to_csv(out_dir / "flagged.csv", index=False)

    names = manifest.attrs.get(LABEL_NAMES_ATTR)
    # Labels written as class names stay names in the new manifests (they load without data.label_names).
    as_written = (lambda frame: frame.assign(label=[names[k] for k in frame["label"]])) if names and _labels_are_names(manifest_path) else (lambda frame: frame)
    write_manifest(as_written(manifest[~flagged]), out_dir / "manifest_filtered.csv")
    flipped = manifest.copy()
    if names and len(names) > 2:
        flipped.loc[flagged, "label"] = relabel_to_most_probable_other(manifest.loc[flagged, "label"], manifest.loc[flagged, "sample_id"].astype(str), out_of_fold_probabilities(runs))
    else:
        flipped.loc[flagged, "label"] = 1 - flipped.loc[flagged, "label"]
    write_manifest(as_written(flipped), out_dir / "manifest_flipped.csv")

    counts = histogram(losses, rule.threshold, histogram_min_exceed, rule.counting)
    counts.to_csv(out_dir / "flag_histogram.csv", index=False)
    plot_histogram(counts, rule.threshold, out_dir / "flag_histogram.png", rule.min_exceed)
    plot_trajectories(losses, flags, rule.threshold, out_dir / "loss_trajectories.png")

    report = {
        "rule": {"threshold": rule.threshold, "min_exceed": rule.min_exceed, "min_fraction": rule.min_fraction, "counting": rule.counting},
        "manifest": str(manifest_path.resolve()),
        "runs": sorted(losses["run"].unique().tolist()),
        "samples": int(len(manifest)),
        "evaluated_samples": int((flags["evaluations"] > 0).sum()),
        "max_evaluations": int(flags["evaluations"].max()),
        "flagged": int(flagged.sum()),
        "flagged_by_label": {str(k): int(v) for k, v in manifest.loc[flagged, "label"].value_counts().sort_index().items()},
        "histogram": {str(m): dict(zip(g["flagged_in"].astype(str), g["samples"].astype(int).tolist())) for m, g in counts.groupby("min_exceed")},
    }
    if "clean_label" in manifest.columns:
        report["against_clean_label"] = flagging_quality(manifest, flagged)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    rule = report["rule"]
    points = "epochs (mean loss per epoch)" if rule.get("counting", "per_draw") == "per_epoch" else "draws"
    lines = [
        f"{len(report['runs'])} run(s), {report['evaluated_samples']} of {report['samples']} samples trained on, up to {report['max_evaluations']} evaluations each",
        f"flagged: {report['flagged']} sample(s) (loss > {rule['threshold']:g} in at least {rule['min_exceed']} {points} in >= {rule['min_fraction']:.0%} of their evaluations), by label {report['flagged_by_label']}",
    ]
    quality = report.get("against_clean_label")
    if quality:
        lines.append(f"against clean_label: precision {quality['precision']:.1%}, recall {quality['recall']:.1%} ({quality['flagged_noisy']} of {quality['noisy_samples']} noisy samples flagged)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- protocol

VARIANTS = ("complete", "filtered", "flipped")
PAPER_TABLE1 = {"complete": ("81.51 ± 2.78", "55.72 ± 4.37"), "filtered": ("88.15 ± 1.94", "68.59 ± 3.30"), "flipped": ("86.78 ± 2.21", "73.17 ± 1.55")}


# ----------------------------------------------------------------------------- command line
