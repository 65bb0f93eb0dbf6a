"""The marker study type: Grad-CAM++ mass on burned-in markers for each arm's fine-tuned models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score

from tus.config import load_config
from tus.data.manifest import load_manifest
from tus.eval.cv_summary import aggregate
from tus.eval.explain import MarkerSensitivity, add_markers, load_images, measure_marker_sensitivity, save_overlay_grid
from tus.methods.classifier import load_finetuned
from tus.runs import write_json_atomic
from tus.stages.finetune_cv import FineTuneCVConfig
from tus.studies.schema import MARKER_METRICS, MarkerEvalConfig


def evaluate_markers(cv_dir: Path, config: MarkerEvalConfig, out_dir: Path) -> dict:
    """Marker sensitivity of each fold x seed model of a finished CV dir; writes ``summary.json`` last.

    Per run: accuracy and F1 on the clean and on the marked test fold, the share of
    predictions the markers flip, and the Grad-CAM++ mass on marker pixels (clean, marked).
    """
    summary_path = out_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    cv_config = load_config(FineTuneCVConfig, cv_dir / "config.yaml")
    frame = load_manifest(cv_config.data.manifest, require_labels=True, decode_images=False, dicom_frames=cv_config.data.dicom_frames).set_index("sample_id")
    folds = pd.read_csv(cv_dir / "folds.csv", dtype={"sample_id": str})
    records = []
    for run in sorted((cv_dir / "runs").glob("fold*-seed*")):
        fold, seed = (int(x) for x in re.match(r"fold(\d+)-seed(\d+)", run.name).groups())
        record_path = out_dir / f"{run.name}.json"
        if not record_path.is_file():
            test = folds[folds["fold"] == fold]
            if config.max_images is not None:
                test = test.iloc[: config.max_images]
            rows = frame.loc[test["sample_id"]]
            result = _marker_sensitivity(run / "model.safetensors", list(rows["abs_path"]), cv_config.data.image_size, config, fold)
            labels = rows["label"].to_numpy()
            record = {"fold": fold, "seed": seed, "num_images": len(rows), **marker_metrics(result, labels)}
            result.per_image(list(rows.index)).assign(label=labels).to_csv(out_dir / f"{run.name}-per_image.csv", index=False)
            if not records and config.overlay_images > 0:
                shown = slice(0, config.overlay_images)
                save_overlay_grid(result.rows(shown), list(rows.index)[shown], out_dir / f"{run.name}-overlays.png", labels[shown].tolist())
            write_json_atomic(record_path, record)
        records.append(json.loads(record_path.read_text()))
    runs = pd.DataFrame(records)
    summary = {"runs": len(records), "seed": config.seed, "max_images": config.max_images, "metrics": aggregate(runs, list(MARKER_METRICS))}
    write_json_atomic(summary_path, summary)
    return summary


def _marker_sensitivity(checkpoint: Path, paths: list[str], image_size: int, config: MarkerEvalConfig, fold: int) -> MarkerSensitivity:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device)
    model = load_finetuned(checkpoint).to(device)
    rng = np.random.default_rng([config.seed, fold])
    parts = []
    for start in range(0, len(paths), config.batch_size):
        images = load_images(paths[start : start + config.batch_size], image_size).to(device)
        marked, masks = add_markers(images, rng, config.markers)
        parts.append(measure_marker_sensitivity(model, images, marked, masks))
    return MarkerSensitivity.concatenate(parts)


def marker_metrics(result: MarkerSensitivity, labels: np.ndarray) -> dict[str, float]:
    summary = result.summary()
    return {
        "clean_accuracy": float(accuracy_score(labels, result.predicted_clean)),
        "clean_f1": float(f1_score(labels, result.predicted_clean, zero_division=0)),
        "marked_accuracy": float(accuracy_score(labels, result.predicted_marked)),
        "marked_f1": float(f1_score(labels, result.predicted_marked, zero_division=0)),
        "flip_rate": summary["prediction_change_rate"],
        "cam_mass_clean": summary["cam_mass_on_markers_clean"],
        "cam_mass_marked": summary["cam_mass_on_markers_marked"],
        "marker_area": summary["marker_area"],
    }
