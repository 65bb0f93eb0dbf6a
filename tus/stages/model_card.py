"""A model card for an exported classifier: what it is, what it was trained on, how well the CV says it does.

Everything is read from what the training wrote (the model's ``config.json``, the CV run dir's ``config.yaml``,
``folds.csv``, ``summary.json``, ``decision.json``, ``refit.json``); the CV numbers are copied from ``summary.json``
unchanged, so the card and the summary cannot disagree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import yaml

import tus
from tus.data.images import content_hash
from tus.eval.cv_metrics import metric_names

INTENDED_USE = (
    "Research use: classifying single B-mode ultrasound images as the training labels define the classes, on images "
    "acquired and prepared like the training images. Not a medical device; not validated for clinical decisions."
)
KNOWN_LIMITS = [
    "Performance is estimated by patient-grouped cross-validation on the training data only; no external test set.",
    "Images from other scanners, presets, sites or populations than the training data may behave differently.",
    "The model sees the whole image as given: text, calipers and markers burned into images can sway it (see marker sensitivity).",
]


def build_model_card(predictor, fmt: str) -> dict:
    """The card of ``predictor`` (:class:`tus.stages.predict.Predictor`) exported as ``fmt``."""
    first = predictor.members[0].config
    hparams = first.get("hparams", {})
    backbone = hparams.get("backbone", {})
    cv_dir = predictor.cv_dir
    card: dict = {
        "tus_version": tus.__version__,
        "format": fmt,
        "model": {
            "kind": predictor.kind,
            "members": [m.name for m in predictor.members],
            "architecture": first.get("architecture"),
            "in_chans": predictor.in_chans,
            "image_size": predictor.image_size,
            "label_names": predictor.label_names,
            "parameters_per_model": sum(p.numel() for p in predictor.members[0].module.parameters()),
        },
        "initialisation": _initialisation(backbone, cv_dir),
        "decision": {
            "threshold": predictor.threshold,
            "rule": predictor.decision.get("rule", "0.5"),
            "calibration": predictor.decision.get("calibration", "none"),
            "temperature": [m.temperature for m in predictor.members],
        },
        "training_data": _training_data(cv_dir, predictor.label_names) if cv_dir else None,
        "evaluation": _evaluation(cv_dir, predictor) if cv_dir else None,
        "intended_use": INTENDED_USE,
        "known_limits": KNOWN_LIMITS + [_marker_sensitivity(cv_dir)],
    }
    return card


def _initialisation(backbone: dict, cv_dir: Path | None) -> dict:
    init = {"init": backbone.get("init"), "weights": backbone.get("weights")}
    if cv_dir is not None:  # the recorded weights path is the training one (init was rewritten to scratch on load)
        recorded = yaml.safe_load((cv_dir / "config.yaml").read_text()).get("model", {})
        init = {"init": recorded.get("init"), "weights": recorded.get("weights")}
    weights = init.get("weights")
    if weights and (Path(weights) / "config.json").is_file():
        encoder = json.loads((Path(weights) / "config.json").read_text())
        init["pretraining"] = {k: encoder.get(k) for k in ("kind", "method", "pretrain_run", "steps", "tus_version") if k in encoder}
    return init


def _training_data(cv_dir: Path, label_names: list[str]) -> dict:
    config = yaml.safe_load((cv_dir / "config.yaml").read_text())
    folds = pd.read_csv(cv_dir / "folds.csv", dtype={"sample_id": str, "patient_id": str})
    if "seed" in folds.columns:  # folds drawn per seed: one block of rows per seed
        folds = folds[folds["seed"] == folds["seed"].iloc[0]]
    manifest = Path(config["data"]["manifest"])
    counts = folds["label"].value_counts().sort_index()
    return {
        "manifest": str(manifest),
        "manifest_sha1": content_hash(manifest) if manifest.is_file() else None,
        "images": int(len(folds)),
        "patients": int(folds["patient_id"].nunique()),
        "class_balance": {label_names[int(k)] if int(k) < len(label_names) else str(k): int(v) for k, v in counts.items()},
        "cropped_views": bool(folds["sample_id"].astype(str).str.contains("#view").any()),
    }


def _evaluation(cv_dir: Path, predictor) -> dict | None:
    path = cv_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    refit = any((m.folder / "refit.json").is_file() for m in predictor.members)
    return {
        "source": str(path),
        "protocol": f"{summary['folds']}-fold patient-grouped CV x {len(summary['seeds'])} seed(s), {summary['runs']} runs; {summary['selection_note']}",
        "metrics": summary["metrics"],
        "ci": summary["ci"],
        "ci_note": summary.get("ci_note"),
        "at_threshold": summary.get("decision"),
        "note": (
            "this model was trained on every labelled image and never evaluated; its expected performance is the CV's below"
            if refit
            else "the CV's test-fold metrics of the fold models (an ensemble of them was not itself evaluated)"
            if predictor.kind == "ensemble"
            else "the CV's metrics over all folds; this fold model's own test fold is in runs.csv"
        ),
    }


def _marker_sensitivity(cv_dir: Path | None) -> str:
    """What ``tus explain`` measured on one of this CV run's models, when its output sits beside the run."""
    if cv_dir is None:
        return "Marker sensitivity not measured: run tus explain on this model."
    for path in sorted(cv_dir.parent.glob("*/marker_sensitivity.json")):
        found = json.loads(path.read_text())
        if str(found.get("checkpoint", "")).startswith(str(cv_dir.resolve())):
            model = Path(found["checkpoint"]).parent.name
            return f"Marker sensitivity (tus explain on {model}, {path}): injected markers changed {found['prediction_change_rate']:.1%} of predictions."
    return "Marker sensitivity not measured: run tus explain on this model."


def render_model_card(card: dict) -> str:
    model, data, evaluation, decision = card["model"], card["training_data"], card["evaluation"], card["decision"]
    lines = [
        "# Model card",
        "",
        f"tus {card['tus_version']}, exported as {card['format']}.",
        "",
        "## Model",
        "",
        f"- {model['kind']} of {len(model['members'])} model(s): {', '.join(model['members'])}",
        f"- architecture: {model['architecture']['library']} `{model['architecture']['name']}`, {model['parameters_per_model']:,} parameters per model",
        f"- input: {model['in_chans']} channel(s), {model['image_size']} x {model['image_size']} px (see preprocess.json)",
        f"- classes: {', '.join(f'{i} = {n}' for i, n in enumerate(model['label_names']))}",
        f"- initialisation: {card['initialisation'].get('init')}" + (f" from `{card['initialisation']['weights']}`" if card["initialisation"].get("weights") else ""),
    ]
    if card["initialisation"].get("pretraining"):
        lines.append(f"- pretraining: {card['initialisation']['pretraining']}")
    if len(model["label_names"]) > 2:
        lines += ["", "## Decision", "", f"- the most probable of the {len(model['label_names'])} classes (argmax; thresholds are binary-only)"]
    else:
        lines += ["", "## Decision", "", f"- threshold {decision['threshold']:.4g} on the probability of `{model['label_names'][-1]}` (rule: {decision['rule']})"]
    lines.append(f"- calibration: {decision['calibration']} (temperature {', '.join(f'{t:.3g}' for t in decision['temperature'])})")
    lines += ["", "## Training data", ""]
    if data:
        lines += [
            f"- manifest `{data['manifest']}` (SHA-1 {data['manifest_sha1']})",
            f"- {data['images']} images of {data['patients']} patients; classes: " + ", ".join(f"{k} {v}" for k, v in data["class_balance"].items()),
            f"- cropped views (tus data crop): {'yes: give cropped views' if data['cropped_views'] else 'no'}",
        ]
    else:
        lines.append("Unknown: the model was exported from outside a CV run dir.")
    lines += ["", "## Cross-validated performance", ""]
    if evaluation:
        lines += [
            evaluation["protocol"] + ".",
            f"Note: {evaluation['note']}.",
            "",
            "| metric | mean | std | 95% CI (patients) |",
            "|---|---|---|---|",
            *[_metric_row(name, evaluation["metrics"].get(name), evaluation["ci"].get(name)) for name in metric_names(model["label_names"])],
        ]
        if evaluation.get("at_threshold"):
            at = evaluation["at_threshold"]
            lines += ["", f"At each fold model's chosen threshold ({at['rule']}):", "", "| metric | mean | std | 95% CI (patients) |", "|---|---|---|---|"]
            lines += [_metric_row(name, at["metrics"].get(name), at["ci"].get(name)) for name in metric_names(model["label_names"])]
    else:
        lines.append("No CV summary found.")
    lines += ["", "## Intended use", "", card["intended_use"], "", "## Known limits", "", *[f"- {limit}" for limit in card["known_limits"]], ""]
    return "\n".join(lines)


def _metric_row(name: str, stats: dict | None, ci: dict | None) -> str:
    def pct(value) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * 100:.1f}"

    stats = stats or {}
    interval = f"[{pct(ci['low'])}, {pct(ci['high'])}]" if ci else "n/a"
    return f"| {name} | {pct(stats.get('mean'))} | {pct(stats.get('std'))} | {interval} |"
