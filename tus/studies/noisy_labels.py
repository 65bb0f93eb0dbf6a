"""The noisy-label protocol as a study: CV runs recording per-sample losses, flag suspicious
labels, then re-run CV on the filtered and the flipped manifests (TesticulUS Tab. 1)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml

from tus.config import ConfigError, apply_overrides, deep_merge, from_dict, load_yaml, to_dict
from tus.eval.noisy_labels import HISTOGRAM_MIN_EXCEED, PAPER_TABLE1, VARIANTS, FlaggingRule, LossTableError, find_loss_tables, format_report, read_losses, write_report


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
    from tus.stages.finetune_cv import FineTuneCVConfig

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
    from tus.models.backbones import create_backbone
    from tus.runs import new_run_dir
    from tus.stages.finetune_cv import FineTuneCVConfig, finetune_callbacks, run_cv

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
    from tus.eval.cv_summary import format_mean_std

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
