"""Noisy-label flagging from per-sample loss trajectories (TesticulUS Sec. 3, thesis Sec. 3.2).

A sample is *suspicious in a run* when its recorded training loss exceeds ``threshold``
(1.0) at least ``min_exceed`` (3) times in that run (every recorded occurrence counts: a
weighted sampler may draw a sample several times per epoch). Its *evaluations* are the runs
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

``tus noisy-labels protocol --config experiments/noisy_labels.yaml`` runs the whole study:
the flagging CVs (one per initialisation), the flagging, then fine-tuning CVs on the
complete, filtered and flipped data, and writes Tab. 1 (``table1.md``/``table1.csv``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tus.data.manifest import load_manifest, write_manifest

HISTOGRAM_MIN_EXCEED = (1, 3, 5)
REQUIRED_LOSS_COLUMNS = ("sample_id", "step", "label", "loss")


@dataclass(frozen=True)
class FlaggingRule:
    threshold: float = 1.0
    min_exceed: int = 3
    min_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.min_exceed < 1 or not 0 < self.min_fraction <= 1:
            raise ValueError(f"need min_exceed >= 1 and 0 < min_fraction <= 1, got {self.min_exceed}, {self.min_fraction}")


class LossTableError(ValueError):
    """Recorded losses are missing, unfinished, malformed or do not match the manifest."""


def find_loss_tables(run_dirs: list[str | Path]) -> list[Path]:
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


def exceedances(losses: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per (run, sample): recorded occurrences and how many had loss > ``threshold``."""
    return (
        losses.assign(exceeded=losses["loss"] > threshold)
        .groupby(["run", "sample_id"], sort=True)
        .agg(occurrences=("loss", "size"), exceedances=("exceeded", "sum"))
        .reset_index()
    )


def flag_counts(per_run: pd.DataFrame, min_exceed: int) -> pd.DataFrame:
    """Per sample: ``evaluations`` (runs it was trained in) and ``flagged_in`` (runs suspicious)."""
    return (
        per_run.assign(suspicious=per_run["exceedances"] >= min_exceed)
        .groupby("sample_id", sort=True)
        .agg(evaluations=("run", "size"), flagged_in=("suspicious", "sum"), exceedances=("exceedances", "sum"))
    )


def flag_samples(losses: pd.DataFrame, rule: FlaggingRule) -> pd.DataFrame:
    """:func:`flag_counts` plus ``flagged``: suspicious in >= ``min_fraction`` of evaluations."""
    counts = flag_counts(exceedances(losses, rule.threshold), rule.min_exceed)
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


def histogram(losses: pd.DataFrame, threshold: float, min_exceeds=HISTOGRAM_MIN_EXCEED) -> pd.DataFrame:
    """Samples per flag count, for each ``min_exceed`` (thesis Fig. 3.3)."""
    per_run = exceedances(losses, threshold)
    rows = []
    for min_exceed in min_exceeds:
        counts = flag_counts(per_run, min_exceed)["flagged_in"].value_counts()
        for flagged_in in range(int(per_run.groupby("sample_id").size().max()) + 1):
            rows.append({"min_exceed": min_exceed, "flagged_in": flagged_in, "samples": int(counts.get(flagged_in, 0))})
    return pd.DataFrame(rows)


def plot_histogram(table: pd.DataFrame, threshold: float, path: Path) -> None:
    min_exceeds = sorted(table["min_exceed"].unique())
    figure = Figure(figsize=(4 * len(min_exceeds), 3.2), layout="constrained")
    axes = figure.subplots(1, len(min_exceeds), squeeze=False)[0]
    for axis, min_exceed in zip(axes, min_exceeds):
        rows = table[table["min_exceed"] == min_exceed]
        bars = axis.bar(rows["flagged_in"], rows["samples"], color="tab:red" if min_exceed == 3 else "tab:gray")
        axis.bar_label(bars, fontsize=7)
        axis.set_xticks(rows["flagged_in"])
        axis.set_title(f"loss > {threshold:g} at least {min_exceed}x")
        axis.set_xlabel("runs in which the sample was suspicious")
    axes[0].set_ylabel("samples")
    figure.savefig(path, dpi=100)


def plot_trajectories(losses: pd.DataFrame, flags: pd.DataFrame, threshold: float, path: Path, count: int = 5) -> None:
    """Loss over training of the ``count`` most and least suspicious samples (thesis Fig. 3.2).

    Each sample is drawn from the first run in which it was trained; a weighted sampler
    gives samples different numbers of points.
    """
    evaluated = flags[flags["evaluations"] > 0].assign(share=lambda f: f["flagged_in"] / f["evaluations"])
    ranked = evaluated.sort_values(["share", "exceedances"], ascending=False, kind="stable")
    groups = (("most suspicious", ranked.index[:count], "tab:red"), ("least suspicious", ranked.index[::-1][:count], "tab:blue"))
    figure = Figure(figsize=(10, 3.5), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for axis, (title, samples, color) in zip(axes, groups):
        for sample in samples:
            rows = losses[losses["sample_id"] == sample]
            rows = rows[rows["run"] == rows["run"].iloc[0]].sort_values("step")
            axis.plot(rows["step"], rows["loss"], marker=".", color=color, alpha=0.7, label=_short(sample))
        axis.axhline(threshold, color="black", linestyle="--", linewidth=1)
        axis.set_title(title)
        axis.set_xlabel("training step")
        axis.legend(fontsize=6)
    axes[0].set_ylabel("per-sample loss")
    figure.savefig(path, dpi=100)


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


def write_report(losses: pd.DataFrame, manifest_path: str | Path, rule: FlaggingRule, out_dir: str | Path, histogram_min_exceed=HISTOGRAM_MIN_EXCEED) -> dict:
    """Flag, and write the report, ``flagged.csv`` and the two new manifests into ``out_dir``."""
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    manifest = load_manifest(manifest_path, require_labels=True, decode_images=False)
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

    write_manifest(manifest[~flagged], out_dir / "manifest_filtered.csv")
    flipped = manifest.copy()
    flipped.loc[flagged, "label"] = 1 - flipped.loc[flagged, "label"]
    write_manifest(flipped, out_dir / "manifest_flipped.csv")

    counts = histogram(losses, rule.threshold, histogram_min_exceed)
    counts.to_csv(out_dir / "flag_histogram.csv", index=False)
    plot_histogram(counts, rule.threshold, out_dir / "flag_histogram.png")
    plot_trajectories(losses, flags, rule.threshold, out_dir / "loss_trajectories.png")

    report = {
        "rule": {"threshold": rule.threshold, "min_exceed": rule.min_exceed, "min_fraction": rule.min_fraction},
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
    lines = [
        f"{len(report['runs'])} run(s), {report['evaluated_samples']} of {report['samples']} samples trained on, up to {report['max_evaluations']} evaluations each",
        f"flagged: {report['flagged']} sample(s) (loss > {rule['threshold']:g} at least {rule['min_exceed']}x in >= {rule['min_fraction']:.0%} of their evaluations), by label {report['flagged_by_label']}",
    ]
    quality = report.get("against_clean_label")
    if quality:
        lines.append(f"against clean_label: precision {quality['precision']:.1%}, recall {quality['recall']:.1%} ({quality['flagged_noisy']} of {quality['noisy_samples']} noisy samples flagged)")
    return "\n".join(lines)




# ----------------------------------------------------------------------------- protocol

VARIANTS = ("complete", "filtered", "flipped")
PAPER_TABLE1 = {"complete": ("81.51 ± 2.78", "55.72 ± 4.37"), "filtered": ("88.15 ± 1.94", "68.59 ± 3.30"), "flipped": ("86.78 ± 2.21", "73.17 ± 1.55")}
















# ----------------------------------------------------------------------------- command line




