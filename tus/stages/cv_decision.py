"""After a CV: each model's decision threshold and (optional) temperature, chosen on out-of-fold predictions.

For the model of test fold ``k`` (seed ``s``) both are fitted on the out-of-fold predictions of the *other* folds
of seed ``s`` (their runs' ``predictions.csv``: predictions on fold ``k``'s training images by models that did
not train on them), never on fold ``k`` itself, so the CV summary's metrics at the chosen threshold stay
held-out estimates. The refit model of seed ``s`` and the fold ensemble get the threshold/temperature fitted
on every out-of-fold prediction of seed ``s`` (or of all seeds): no held-out data remains to check those on,
and their expected performance is the CV's.

Written: ``decision.json`` in the run dir, and a ``decision`` key in every fold and refit model's
``config.json`` (``threshold``, ``temperature``, ``rule``, ``calibration``, ``fitted_on``), which
``tus predict`` and ``tus export`` use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tus.config import write_text_atomic
from tus.eval.calibration import apply_temperature, binary_logits, fit_temperature, out_of_fold_temperatures
from tus.eval.cv_summary import DECISION_FILE, pooled_predictions
from tus.eval.thresholds import choose_threshold, out_of_fold_thresholds, parse_threshold_rule
from tus.models.export import CONFIG_FILE

CALIBRATIONS = ("none", "temperature")
FOLD_NOTE = "out-of-fold predictions of this model's training folds (the other folds' test predictions, same seed); its test fold never took part"
POOLED_NOTE = "every out-of-fold prediction of the seed(s) (no held-out set remains for this model; its expected performance is the CV's)"


def decide(run_dir: Path, frame: pd.DataFrame, rule: str, calibration: str) -> dict | None:
    """Fit and record thresholds/temperatures for every model of ``run_dir``; None (nothing written) for the
    default (fixed 0.5, no calibration), so runs that do not ask keep their files as before."""
    parsed = parse_threshold_rule(rule)
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    if not parsed.needs_data and parsed.value == 0.5 and calibration == "none":
        _clear(run_dir)
        return None
    predictions = pooled_predictions(run_dir, frame)
    if predictions.empty:
        return None
    if "prob" not in predictions.columns:
        raise ValueError(f"{run_dir}: threshold rule {rule!r} and calibration {calibration!r} are binary-only; this CV has K > 2 classes (prediction = the most probable class)")
    calibrate = calibration == "temperature"
    temperatures = out_of_fold_temperatures(predictions) if calibrate else {}
    raw_thresholds = out_of_fold_thresholds(predictions, parsed)
    per_run = []
    for (fold, seed), raw in sorted(raw_thresholds.items()):
        temperature = temperatures.get((fold, seed), 1.0)
        threshold = _calibrated(raw, temperature) if parsed.needs_data else raw
        per_run.append({"fold": fold, "seed": seed, "threshold": threshold, "temperature": temperature})
    pooled = {str(seed): _pooled(group, parsed, calibrate) for seed, group in predictions.groupby("seed")}
    decision = {
        "rule": str(parsed),
        "calibration": calibration,
        "per_run": per_run,
        "per_seed": pooled,
        "all_seeds": _pooled(predictions, parsed, calibrate),
        "fold_note": FOLD_NOTE,
        "pooled_note": POOLED_NOTE,
    }
    write_text_atomic(run_dir / DECISION_FILE, json.dumps(decision, indent=2))
    for run in per_run:
        _record(run_dir / "runs" / f"fold{run['fold']}-seed{run['seed']}", run, decision, FOLD_NOTE)
    for seed_name, chosen in pooled.items():
        _record(run_dir / "runs" / f"refit-seed{seed_name}", chosen, decision, POOLED_NOTE)
    return decision


def _calibrated(threshold: float, temperature: float) -> float:
    """A threshold on raw probabilities moved onto the calibrated scale (temperature scaling is monotone)."""
    return float(apply_temperature(np.array([threshold]), temperature)[0]) if temperature != 1.0 else float(threshold)


def _pooled(predictions: pd.DataFrame, rule, calibrate: bool) -> dict:
    temperature = fit_temperature(binary_logits(predictions["prob"].to_numpy()), predictions["label"].to_numpy()) if calibrate else 1.0
    if not rule.needs_data:  # a fixed threshold applies to the output (calibrated) probability as given
        return {"threshold": float(rule.value), "temperature": temperature}
    raw = choose_threshold(rule, predictions["label"].to_numpy(), predictions["prob"].to_numpy())
    return {"threshold": _calibrated(raw, temperature), "temperature": temperature}


def _record(folder: Path, chosen: dict, decision: dict, note: str) -> None:
    """Add the ``decision`` key to a model folder's config.json (atomically), if that model exists."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    config["decision"] = {
        "threshold": chosen["threshold"],
        "temperature": chosen["temperature"],
        "rule": decision["rule"],
        "calibration": decision["calibration"],
        "fitted_on": note,
    }
    write_text_atomic(path, json.dumps(config, indent=2))


def _clear(run_dir: Path) -> None:
    """Back to the default: drop a decision an earlier pass over this run dir recorded."""
    (run_dir / DECISION_FILE).unlink(missing_ok=True)
    for path in (run_dir / "runs").glob(f"*/{CONFIG_FILE}"):
        config = json.loads(path.read_text())
        if config.pop("decision", None) is not None:
            write_text_atomic(path, json.dumps(config, indent=2))
