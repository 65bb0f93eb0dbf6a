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

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from tus.config import ConfigError, apply_overrides, deep_merge, from_dict, load_yaml, to_dict
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


def training_manifest(run_dirs: list[str | Path]) -> Path:
    """The ``data.manifest`` the runs were trained on (their config.yaml), which must agree."""
    manifests = set()
    for run_dir in map(Path, run_dirs):
        config = next((d / "config.yaml" for d in [run_dir, *list(run_dir.resolve().parents)[:2]] if (d / "config.yaml").is_file()), None)
        manifest = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("manifest") if config else None
        if not manifest:
            raise LossTableError(f"{run_dir}: no config.yaml naming data.manifest; give --manifest")
        manifests.add(manifest)
    if len(manifests) > 1:
        raise LossTableError(f"the runs were trained on different manifests {sorted(manifests)}; give --manifest")
    return Path(manifests.pop())


# ----------------------------------------------------------------------------- protocol

VARIANTS = ("complete", "filtered", "flipped")
PAPER_TABLE1 = {"complete": ("81.51 ± 2.78", "55.72 ± 4.37"), "filtered": ("88.15 ± 1.94", "68.59 ± 3.30"), "flipped": ("86.78 ± 2.21", "73.17 ± 1.55")}


@dataclass
class NoisyLabelsProtocol:
    """The ``noisy_labels:`` section of a protocol config; the rest is a fine-tuning config.

    ``inits`` maps a name to the fine-tuning options that make that initialisation, as a
    nested mapping or with dotted keys, e.g. ``{imagenet: {model.init: timm}, uscl:
    {model: {init: uscl, weights: PATH}}}``. ``evaluation`` holds options applied to the
    three final fine-tuning CVs only.
    """

    inits: dict[str, dict] = field(default_factory=lambda: {"imagenet": {"model": {"init": "timm"}}})
    threshold: float = 1.0
    min_exceed: int = 3
    min_fraction: float = 1.0
    histogram_min_exceed: list[int] = field(default_factory=lambda: list(HISTOGRAM_MIN_EXCEED))
    variants: list[Literal["complete", "filtered", "flipped"]] = field(default_factory=lambda: list(VARIANTS))
    evaluation: dict = field(default_factory=dict)


def expand_dotted(options: dict) -> dict:
    """``{"model.init": "timm"}`` -> ``{"model": {"init": "timm"}}`` (nested keys also expanded)."""
    expanded: dict = {}
    for key, value in options.items():
        value = expand_dotted(value) if isinstance(value, dict) else value
        for part in reversed(str(key).split(".")):
            value = {part: value}
        expanded = deep_merge(expanded, value)
    return expanded


def load_protocol(path: str | Path, overrides: list[str] = ()) -> tuple[dict, NoisyLabelsProtocol]:
    """(fine-tuning config mapping, protocol) from a protocol YAML plus ``key=value`` overrides."""
    from tus.cv import FineTuneCVConfig

    data = apply_overrides(load_yaml(path), list(overrides))
    protocol = from_dict(NoisyLabelsProtocol, data.pop("noisy_labels", None), "noisy_labels")
    if not protocol.inits:
        raise ConfigError("noisy_labels.inits: give at least one initialisation")
    from_dict(FineTuneCVConfig, data)  # fail now, not after hours of training
    for name, options in {**protocol.inits, "evaluation": protocol.evaluation}.items():
        where = f"noisy_labels.inits.{name}" if name in protocol.inits else "noisy_labels.evaluation"
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: expected a mapping of fine-tuning options, got {options!r}")
        try:
            from_dict(FineTuneCVConfig, deep_merge(data, expand_dotted(options)))
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from error
    return data, protocol


def run_protocol(finetune: dict, protocol: NoisyLabelsProtocol, out_dir: str | Path | None = None) -> Path:
    """Flagging CVs, flagging, complete/filtered/flipped CVs and Tab. 1; resumable in ``out_dir``."""
    from tus.cv import FineTuneCVConfig, run_cv
    from tus.models.backbones import create_backbone
    from tus.stage_callbacks import finetune_callbacks
    from tus.training import new_run_dir

    base = from_dict(FineTuneCVConfig, finetune)
    out_dir = Path(out_dir) if out_dir else new_run_dir(base.output_root, base.name)
    _save_or_check(out_dir / "protocol.yaml", {**finetune, "noisy_labels": to_dict(protocol)})

    flagging = {}
    for name, options in protocol.inits.items():
        options = deep_merge(expand_dotted(options), {"name": f"{base.name}-flag-{name}", "init_label": name, "record_losses": True})
        flagging[name] = from_dict(FineTuneCVConfig, deep_merge(finetune, options))
        create_backbone(flagging[name].model)  # a missing weights file fails now, not after the first init's runs
    flag_dirs = [run_cv(config, out_dir / "flagging" / name, callback_factory=finetune_callbacks) for name, config in flagging.items()]

    flags_dir = out_dir / "flags"
    if not (flags_dir / "report.json").is_file():
        partial = out_dir / "flags.partial"
        if partial.exists():  # an interrupted earlier attempt of this same step
            shutil.rmtree(partial)
        rule = FlaggingRule(protocol.threshold, protocol.min_exceed, protocol.min_fraction)
        write_report(read_losses(find_loss_tables(flag_dirs)), base.data.manifest, rule, partial, protocol.histogram_min_exceed)
        partial.rename(flags_dir)
    report = json.loads((flags_dir / "report.json").read_text())
    print(format_report(report))

    manifests = {"complete": base.data.manifest, "filtered": str(flags_dir / "manifest_filtered.csv"), "flipped": str(flags_dir / "manifest_flipped.csv")}
    results = {}
    for variant in protocol.variants:
        options = deep_merge(expand_dotted(protocol.evaluation), {"name": f"{base.name}-{variant}", "data": {"manifest": manifests[variant]}})
        cv_dir = run_cv(from_dict(FineTuneCVConfig, deep_merge(finetune, options)), out_dir / "evaluation" / variant, callback_factory=finetune_callbacks)
        results[variant] = json.loads((cv_dir / "summary.json").read_text())
    if results:
        table = table1(results, report)
        table.to_csv(out_dir / "table1.csv", index=False)
        (out_dir / "table1.md").write_text(render_table1(table, report))
        print((out_dir / "table1.md").read_text())
    print(f"run dir: {out_dir}")
    return out_dir


def _save_or_check(path: Path, resolved: dict) -> None:
    if path.is_file():
        if yaml.safe_load(path.read_text()) != resolved:
            raise ConfigError(f"{path}: this protocol dir was started with another config; start a new one (omit --out)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))


def table1(results: dict[str, dict], report: dict) -> pd.DataFrame:
    """Accuracy and F1 (mean, sample std over fold x seed runs) per dataset variant."""
    images = {"complete": report["samples"], "filtered": report["samples"] - report["flagged"], "flipped": report["samples"]}
    rows = []
    for variant, summary in results.items():
        metrics = summary["metrics"]
        rows.append({
            "dataset": variant,
            "images": images[variant],
            "changed": 0 if variant == "complete" else report["flagged"],
            "runs": summary["runs"],
            "accuracy_mean": metrics["accuracy"]["mean"],
            "accuracy_std": metrics["accuracy"]["std"],
            "f1_mean": metrics["f1"]["mean"],
            "f1_std": metrics["f1"]["std"],
        })
    return pd.DataFrame(rows)


def render_table1(table: pd.DataFrame, report: dict) -> str:
    from tus.cv import format_mean_std

    lines = [
        "# Noisy labels: fine-tuning on the complete, filtered and flipped data (TesticulUS Tab. 1)",
        "",
        "| Dataset | Images | Removed/flipped | Accuracy | F1-Score | Paper accuracy | Paper F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        accuracy = format_mean_std({"mean": row.accuracy_mean, "std": row.accuracy_std})
        f1 = format_mean_std({"mean": row.f1_mean, "std": row.f1_std})
        paper_accuracy, paper_f1 = PAPER_TABLE1[row.dataset]
        lines.append(f"| {row.dataset.capitalize()} | {row.images} | {row.changed} | {accuracy} | {f1} | {paper_accuracy} | {paper_f1} |")
    return "\n".join([
        *lines,
        "",
        "Mean ± sample std (%) over each CV's fold x seed runs. Paper: 880 images, 72 flagged.",
        "",
        "Flagging: " + format_report(report).replace("\n", "; "),
        "",
    ])


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["protocol"]:
        return protocol_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tus noisy-labels", description="Flag samples whose recorded training loss keeps exceeding a threshold; write a report and filtered/flipped manifests. 'tus noisy-labels protocol --help' runs the whole study.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished fine-tuning CV run dirs (with runs/*/losses.csv)")
    parser.add_argument("--threshold", type=float, default=1.0, help="loss above which an occurrence counts as an exceedance")
    parser.add_argument("--min-exceed", type=int, default=3, help="exceedances that make a sample suspicious in a run")
    parser.add_argument("--min-fraction", type=float, default=1.0, help="share of its evaluations in which a sample must be suspicious (1 = all)")
    parser.add_argument("--manifest", default=None, help="the labelled manifest the runs were trained on (default: from their config.yaml)")
    parser.add_argument("--out", required=True, help="new output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; outputs go to a new folder")
    try:
        rule = FlaggingRule(args.threshold, args.min_exceed, args.min_fraction)
        manifest = Path(args.manifest) if args.manifest else training_manifest(args.run_dirs)
        report = write_report(read_losses(find_loss_tables(args.run_dirs)), manifest, rule, out)
    except (LossTableError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}")
        return 1
    print(format_report(report))
    print(f"written to {out}")
    return 0


def protocol_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tus noisy-labels protocol", description="The noisy-label study: flagging CVs per initialisation, flagging, then fine-tuning on complete/filtered/flipped data (Tab. 1).")
    parser.add_argument("--config", default="experiments/noisy_labels.yaml")
    parser.add_argument("--out", default=None, help="protocol dir to resume (default: a new one under output_root)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.max_epochs=5 noisy_labels.min_exceed=4")
    args = parser.parse_args(argv)
    try:
        finetune, protocol = load_protocol(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}")
        return 2
    run_protocol(finetune, protocol, args.out)
    return 0
