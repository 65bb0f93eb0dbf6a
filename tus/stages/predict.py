"""``tus predict``: a trained classifier (a CV run's fold ensemble, one fold model, or the refit model) on new images.

The model says how its input is made (``config.json``: ``image_size``, ``in_chans``, ``normalization``): each
image is decoded and resized exactly as training saw it (:func:`tus.data.cache.decode_resized`) and normalised by
the evaluation transform (:func:`tus.data.transforms.eval_transform`), with no augmentation; nothing about the
input is asked of the user. Each image is decoded once, whatever the number of models; batches run under
``torch.inference_mode``.

MODEL is

- a CV run dir (``config.yaml`` + ``runs/``): the ensemble, mean class probability over its fold models (of one
  ``seed``, or of every seed), with the threshold of its ``decision.json`` (0.5 without one); with ``refit``, the
  run's refit model(s) (``runs/refit-seed<S>``) instead;
- one exported classifier folder (a fold's ``runs/fold<F>-seed<S>``, a refit's ``runs/refit-seed<S>``): that
  model, with the threshold and temperature recorded in its ``config.json`` (``decision``).

Output (one CSV row per image): ``sample_id``, ``path``, ``prob_<class>`` per class, ``prediction`` (the class's
name), ``spread`` (the std of the probability over the ensemble's models: a simple uncertainty; see
:func:`predict_frame`), plus ``patient_id`` and ``label`` when the manifest has them. With labels, the metrics at the model's threshold
and a table with patient-bootstrap CIs are written beside it (``<out>.metrics.json``, ``<out>.summary.md``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import tus
from tus.config import write_text_atomic
from tus.data.cache import decode_resized, resize_square
from tus.data.images import (
    DICOM_SUFFIXES,
    FRAME_MARK,
    IMAGE_SUFFIXES,
    DataError,
    ImageReadError,
    OutputExistsError,
    UsageError,
    dicom_frame_count,
    is_dicom,
    list_images,
    read_dicom_header,
    read_grayscale,
)
from tus.data.manifest import chosen_frames, load_manifest
from tus.data.transforms import eval_transform
from tus.eval.cv_summary import CI_ALPHA, CI_BOOTSTRAPS, DECISION_FILE, bootstrap_cis
from tus.eval.thresholds import DEFAULT_THRESHOLD, confusion_metrics
from tus.methods.classifier import LABEL_NAMES, METRIC_NAMES, FineTuneModule, load_finetuned
from tus.models.export import FORMAT_VERSION, read_export_config
from tus.models.weights import CheckpointError


@dataclass
class Member:
    """One classifier of a predictor: its folder, module, export config and temperature."""

    name: str
    folder: Path
    module: FineTuneModule
    config: dict
    temperature: float = 1.0


@dataclass
class Predictor:
    """The models that vote (one, or a CV's folds), how their input is made, and the decision threshold."""

    source: Path
    members: list[Member]
    image_size: int
    in_chans: int
    normalization: dict
    label_names: list[str]
    threshold: float = DEFAULT_THRESHOLD
    decision: dict = field(default_factory=dict)
    cv_dir: Path | None = None
    # How an image file became a training image before resizing: the DICOM frame choice and the
    # crop recipe of a ``tus data crop`` training set (config.json's ``input``; see save_finetuned).
    input: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "ensemble" if len(self.members) > 1 else "single"

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def check_tus_version(config: dict, source: Path) -> None:
    """Refuse an export of another format or tus version (major.minor), naming both."""
    written = config.get("tus_version")
    if config.get("format_version") != FORMAT_VERSION or written is None or _minor(written) != _minor(tus.__version__):
        raise CheckpointError(
            f"{source}: written by tus {written or 'before 0.1 exports'} (export format {config.get('format_version')}); this is tus {tus.__version__} "
            f"(format {FORMAT_VERSION}): predict with the tus that wrote it, or retrain/re-export with this one"
        )


def _minor(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:2])


def is_cv_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and (path / "runs").is_dir()


def cv_dir_of(folder: Path) -> Path | None:
    """The CV run dir a fold or refit model folder (``<cv>/runs/<name>``) lives in, if any."""
    candidate = folder.resolve().parent.parent
    return candidate if folder.resolve().parent.name == "runs" and is_cv_run_dir(candidate) else None


def load_member(folder: Path) -> Member:
    """One exported classifier, refused in one line if it is not a classifier of this tus version."""
    folder = Path(folder)
    _, config = read_export_config(folder, "classifier")
    check_tus_version(config, folder)
    if not config.get("image_size"):
        cv = cv_dir_of(folder if folder.is_dir() else folder.parent)
        size = yaml.safe_load((cv / "config.yaml").read_text())["data"]["image_size"] if cv else None
        if not size:
            raise CheckpointError(f"{folder}: its config.json records no image_size; re-export it with this tus")
        config = {**config, "image_size": int(size)}
    module = load_finetuned(folder)
    decision = config.get("decision") or {}
    return Member(folder.name if folder.is_dir() else folder.parent.name, folder if folder.is_dir() else folder.parent, module, config, float(decision.get("temperature", 1.0)))


def load_predictor(model: str | Path, *, seed: int | None = None, refit: bool = False) -> Predictor:
    """The predictor MODEL names (see the module docstring); ``seed``/``refit`` pick within a CV run dir."""
    model = Path(model)
    if not model.exists():
        raise FileNotFoundError(f"--model {model}: not found")
    cv_dir: Path | None = None
    decision: dict = {}
    if is_cv_run_dir(model):
        cv_dir = model
        folders = _cv_members(model, seed, refit)
        decision = _ensemble_decision(model, seed, refit)
    else:
        if seed is not None or refit:
            raise UsageError(f"--seed/--refit choose models inside a CV run dir; {model} is one model")
        folders = [model]
        cv_dir = cv_dir_of(model if model.is_dir() else model.parent)
    members = [load_member(folder) for folder in folders]
    first = members[0].config
    keys = ("image_size", "in_chans", "normalization", "num_classes", "input")
    for member in members[1:]:
        differing = [k for k in keys if member.config.get(k) != first.get(k)]
        if differing:
            raise CheckpointError(f"{member.folder}: its {', '.join(differing)} differ from {members[0].folder}'s; an ensemble's models must take the same input")
    if len(members) == 1 and not decision:
        decision = first.get("decision") or {}
    label_names = list(first.get("label_names") or LABEL_NAMES[: int(first.get("num_classes", 2))])
    return Predictor(
        source=model,
        members=members,
        image_size=int(first["image_size"]),
        in_chans=int(first.get("in_chans", 1)),
        normalization=first["normalization"],
        label_names=label_names,
        threshold=float(decision.get("threshold", DEFAULT_THRESHOLD)),
        decision=decision,
        cv_dir=cv_dir,
        input=first.get("input") or {},
    )


def _cv_members(cv_dir: Path, seed: int | None, refit: bool) -> list[Path]:
    runs = cv_dir / "runs"
    if refit:
        found = sorted(p for p in runs.glob("refit-seed*") if (p / "refit.json").is_file())
        what = "refit model (finetune-cv --refit=true)"
    else:
        found = sorted(p for p in runs.glob("fold*-seed*") if (p / "metrics.json").is_file())
        what = "finished fold model"
    if seed is not None:
        found = [p for p in found if p.name.endswith(f"-seed{seed}")]
    if not found:
        raise CheckpointError(f"{cv_dir}: no {what}{f' of seed {seed}' if seed is not None else ''} in it")
    return found


def _ensemble_decision(cv_dir: Path, seed: int | None, refit: bool) -> dict:
    """The CV's threshold/temperature for its ensemble (or refit), from ``decision.json``; {} without one."""
    path = cv_dir / DECISION_FILE
    if not path.is_file():
        return {}
    decision = json.loads(path.read_text())
    chosen = decision["per_seed"].get(str(seed)) if seed is not None else decision["all_seeds"]
    return {**(chosen or {}), "rule": decision["rule"], "calibration": decision["calibration"]}


# --- images -------------------------------------------------------------------------------------


def read_inputs(images: str | Path, dicom_frames: str = "middle", label_names: list[str] | None = None) -> pd.DataFrame:
    """``sample_id``, ``path``, ``abs_path`` (+ ``patient_id``, ``label`` when known) of a folder or manifest.

    A multi-frame DICOM gives the frame(s) ``dicom_frames`` chooses (the model's own choice at training),
    each ``<file>#frame<k>``, in a folder as in a manifest. ``label_names``: a K > 2-class model's classes;
    a manifest's labels are then these names or indices."""
    images = Path(images)
    if images.is_dir():
        paths = list_images(images, dicom=True)
        if not paths:
            raise DataError(f"--images {images}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)})")
        rows = []
        for path in paths:
            for frame in dicom_frames_of(path, dicom_frames):
                name = path.name if frame is None else f"{path.name}{FRAME_MARK}{frame}"
                rows.append({"sample_id": name, "path": str(path.with_name(name)), "abs_path": str(path.resolve().with_name(name))})
        return pd.DataFrame(rows)
    if not images.is_file():
        raise FileNotFoundError(f"--images {images}: no such folder or manifest")
    frame = load_manifest(images, require_labels=False, require_patients=False, decode_images=False, dicom_frames=dicom_frames, label_names=label_names)
    if frame.empty:
        raise DataError(f"--images {images}: the manifest lists no images")
    columns = ["sample_id", "path", "abs_path"] + [c for c in ("patient_id", "label") if c in frame.columns]
    out = frame[columns].copy()
    out["sample_id"] = out["sample_id"].astype(str)
    if "label" in out.columns:
        out["label"] = out["label"].astype(int)
        if (out["label"] < 0).any():  # partly labelled: predictions only
            out = out.drop(columns="label")
    return out


def dicom_frames_of(path: Path, dicom_frames: str) -> list[int | None]:
    """The frames of ``path`` to predict: [None] for a single image, the chosen frame(s) of a cine loop."""
    if not is_dicom(path):
        return [None]
    try:
        count = dicom_frame_count(read_dicom_header(path))
    except ImageReadError as error:
        raise ImageReadError(f"{path}: {error}") from error
    if count == 1:
        return [None]
    chosen = chosen_frames(count, dicom_frames)
    if chosen[-1] >= count:
        raise ImageReadError(f"{path}: the model was trained on frame {chosen[-1]} of each cine loop (data.dicom_frames), but this DICOM has {count} frame(s)")
    return list(chosen)


def crop_views(inputs: pd.DataFrame, recipe: dict) -> pd.DataFrame:
    """One row per view of each image by the training set's crop recipe (:func:`tus.data.crop.view_boxes`):
    ``sample_id`` ``<id>#view<k>`` as ``tus data crop`` names it, ``view_index`` and ``box`` (``x0,y0,x1,y1``)."""
    from tus.data.crop import view_boxes

    rows = []
    for row in inputs.to_dict("records"):
        image = read_grayscale(row["abs_path"])
        for k, (x0, y0, x1, y1) in enumerate(view_boxes(image, row["abs_path"], recipe, row["path"])):
            rows.append({**row, "sample_id": f"{row['sample_id']}#view{k}", "view_index": k, "box": f"{x0},{y0},{x1},{y1}"})
    return pd.DataFrame(rows, columns=[*inputs.columns, "view_index", "box"])


class _InputImages(Dataset):
    """Decoded, resized and normalised images; a file that cannot be read comes back as its error text,
    so the error names the file in one line even from a DataLoader worker. ``boxes`` (``x0,y0,x1,y1``
    per image, or None) crop each image before resizing, as ``tus data crop`` cut the training views."""

    def __init__(self, paths: list[str], size: int, normalization: dict, channels: int, boxes: list[str] | None = None):
        self.paths = paths
        self.size = size
        self.boxes = boxes
        self.transform = eval_transform(normalization, channels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            if self.boxes is None:
                image = decode_resized(self.paths[index], self.size)
            else:
                x0, y0, x1, y1 = (int(v) for v in self.boxes[index].split(","))
                image = resize_square(np.ascontiguousarray(read_grayscale(self.paths[index])[y0:y1, x0:x1]), self.size)
        except ImageReadError as error:
            return {"error": str(error), "index": index}
        return {"image": self.transform(image), "index": index}


def _collate(items: list[dict]) -> dict:
    for item in items:
        if "error" in item:
            raise ImageReadError(item["error"])
    return {"image": torch.stack([item["image"] for item in items]), "index": torch.tensor([item["index"] for item in items])}


@torch.inference_mode()
def member_probabilities(predictor: Predictor, paths: list[str], *, batch_size: int = 64, workers: int = 0, progress: bool = True, boxes: list[str] | None = None) -> np.ndarray:
    """(members, images, classes) class probabilities, each member's logits divided by its temperature."""
    dataset = _InputImages(paths, predictor.image_size, predictor.normalization, predictor.in_chans, boxes)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    out = np.empty((len(predictor.members), len(paths), predictor.num_classes), dtype=np.float64)
    modules = [member.module.eval() for member in predictor.members]
    with tqdm(total=len(paths), desc="predict", unit="image", disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            rows = batch["index"].numpy()
            for m, (member, module) in enumerate(zip(predictor.members, modules)):
                logits = module(batch["image"]).float()
                out[m, rows] = (logits / member.temperature).softmax(1).double().numpy()
            bar.update(len(rows))
    return out


def predict_frame(predictor: Predictor, inputs: pd.DataFrame, probabilities: np.ndarray) -> pd.DataFrame:
    """The per-image table from (members, images, classes) probabilities.

    ``prob_<class>``: the mean over members; ``prediction``: the positive class (index 1) when its
    probability is at or above the threshold for a binary model, else the most probable class; ``spread``:
    the std (ddof=0) over members of the probability of the positive class (binary) or of the predicted class,
    empty for a single model.
    """
    mean = probabilities.mean(axis=0)
    if predictor.num_classes == 2:
        predicted = (mean[:, 1] >= predictor.threshold).astype(int)
        spread_of = np.ones(len(mean), dtype=int)
    else:
        predicted = mean.argmax(axis=1)
        spread_of = predicted
    spread = probabilities[:, np.arange(len(mean)), spread_of].std(axis=0) if len(probabilities) > 1 else np.full(len(mean), np.nan)
    table = inputs[["sample_id", "path"] + [c for c in ("view_index", "box", "patient_id", "label") if c in inputs.columns]].reset_index(drop=True).copy()
    for k, name in enumerate(predictor.label_names):
        table[f"prob_{name}"] = mean[:, k]
    table["prediction"] = [predictor.label_names[i] for i in predicted]
    table["spread"] = spread
    return table


def multiclass_labelled_summary(predictor: Predictor, table: pd.DataFrame, n_boot: int = CI_BOOTSTRAPS) -> dict:
    """A K > 2-class model's macro and per-class metrics (prediction = the most probable class) and their
    patient-bootstrap CIs on labelled images."""
    from tus.eval.cv_metrics import multiclass_metrics, probability_columns
    from tus.eval.statistics import multiclass_bootstrap_cis

    names = list(predictor.label_names)
    probs = table[probability_columns(names)].to_numpy()
    labels = table["label"].to_numpy().astype(int)
    metrics = multiclass_metrics(labels, probs, names)
    pooled = table[probability_columns(names)].assign(patient_id=table["patient_id"] if "patient_id" in table else table["sample_id"], label=labels, pred=probs.argmax(1))
    cis = {
        k: {"low": None if math.isnan(low) else low, "high": None if math.isnan(high) else high} for k, (low, high) in multiclass_bootstrap_cis(pooled, names, n_boot=n_boot, alpha=CI_ALPHA).items()
    }
    return {
        "images": int(len(table)),
        "patients": int(pooled["patient_id"].nunique()),
        "label_names": names,
        "class_rates": {name: float((labels == k).mean()) for k, name in enumerate(names)},
        "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()},
        "ci": cis,
        "ci_note": f"{1 - CI_ALPHA:.0%} percentile bootstrap over patients ({n_boot} resamples)",
    }


def labelled_summary(predictor: Predictor, table: pd.DataFrame, n_boot: int = CI_BOOTSTRAPS) -> dict:
    """Metrics at the predictor's threshold and patient-bootstrap CIs (binary models with labels)."""
    positive = f"prob_{predictor.label_names[1]}"
    labels, probs = table["label"].to_numpy(), table[positive].to_numpy()
    metrics = confusion_metrics(labels, probs, predictor.threshold)
    pooled = pd.DataFrame({"patient_id": table["patient_id"] if "patient_id" in table else table["sample_id"], "label": labels, "prob": probs, "pred": (probs >= predictor.threshold).astype(int)})
    both_classes = pooled["label"].nunique() == 2
    metrics["auroc"] = float(_auroc(labels, probs)) if both_classes else math.nan
    cis = bootstrap_cis(pooled, metrics=[m for m in METRIC_NAMES if both_classes or m != "auroc"], n_boot=n_boot)
    return {
        "images": int(len(table)),
        "patients": int(pooled["patient_id"].nunique()),
        "positive_rate": float(labels.mean()),
        "threshold": predictor.threshold,
        "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()},
        "ci": cis,
        "ci_note": f"{1 - CI_ALPHA:.0%} percentile bootstrap over patients ({n_boot} resamples)",
    }


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, probs))


def render_labelled_summary(summary: dict, name: str) -> str:
    if "label_names" in summary:
        return render_multiclass_labelled_summary(summary, name)
    names = list(METRIC_NAMES)
    header = "| | " + " | ".join("AUROC" if n == "auroc" else n.capitalize() for n in names) + " |"
    value = "| " + name + " | " + " | ".join("n/a" if summary["metrics"].get(n) is None else f"{summary['metrics'][n] * 100:.1f}" for n in names) + " |"
    ci = "| *95% CI, patients* | " + " | ".join(f"[{summary['ci'][n]['low'] * 100:.1f}, {summary['ci'][n]['high'] * 100:.1f}]" if n in summary["ci"] else "n/a" for n in names) + " |"
    return "\n".join(
        [
            header,
            "|---" * (len(names) + 1) + "|",
            value,
            ci,
            "",
            f"{summary['images']} images of {summary['patients']} patients ({summary['positive_rate']:.1%} positive); threshold {summary['threshold']:.4g}; "
            f"specificity {summary['metrics']['specificity'] * 100:.1f}. {summary['ci_note']}.",
            "",
        ]
    )


def render_multiclass_labelled_summary(summary: dict, name: str) -> str:
    from tus.eval.cv_metrics import MULTICLASS_METRIC_NAMES, PER_CLASS_METRICS

    def cell(key: str) -> str:
        value = summary["metrics"].get(key)
        ci = summary["ci"].get(key) or {}
        if value is None:
            return "n/a"
        return f"{value * 100:.1f}" + (f" [{ci['low'] * 100:.1f}, {ci['high'] * 100:.1f}]" if ci.get("low") is not None else "")

    names = list(MULTICLASS_METRIC_NAMES)
    rows = [
        "| | " + " | ".join(n.replace("_", " ").capitalize() if n in ("accuracy", "balanced_accuracy") else f"Macro {n if n != 'auroc' else 'AUROC'}" for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    rows.append("| " + name + " | " + " | ".join(cell(n) for n in names) + " |")
    for label in summary["label_names"]:
        rows.append(f"| class {label} | " + " | ".join(cell(f"{n}_{label}") if n in PER_CLASS_METRICS else "" for n in names) + " |")
    shares = ", ".join(f"{k} {v:.1%}" for k, v in summary["class_rates"].items())
    return "\n".join([*rows, "", f"{summary['images']} images of {summary['patients']} patients ({shares}); prediction = the most probable class; [95% CI, patients]: {summary['ci_note']}.", ""])


def run_predict(
    model: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    seed: int | None = None,
    refit: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    crop: str = "auto",
) -> dict:
    """Predict MODEL on ``images`` into the new file ``out`` (a CSV); returns what was written.

    ``crop``: ``auto`` cuts each image into views by the recipe the model's training set was cropped with
    (``tus data crop``; nothing when it was not), ``none`` takes the images as they are (already cropped).

    Everything is computed before anything is written, and each file is written atomically, so a bad
    model, an empty folder or an unreadable image leaves nothing behind.
    """
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"--out {out}: exists; predictions go to a new file")
    if batch_size < 1 or workers < 0:
        raise UsageError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    if crop not in ("auto", "none"):
        raise UsageError(f"--crop must be auto or none, got {crop!r}")
    predictor = load_predictor(model, seed=seed, refit=refit)
    inputs = read_inputs(images, str(predictor.input.get("dicom_frames", "middle")), predictor.label_names if predictor.num_classes > 2 else None)
    recipe = predictor.input.get("crop") if crop == "auto" else None
    if recipe:
        inputs = crop_views(inputs, recipe)
    boxes = inputs["box"].tolist() if recipe else None
    probabilities = member_probabilities(predictor, inputs["abs_path"].tolist(), batch_size=batch_size, workers=workers, progress=progress, boxes=boxes)
    table = predict_frame(predictor, inputs, probabilities)
    summary = None
    if "label" in table.columns and predictor.num_classes == 2:
        summary = labelled_summary(predictor, table)
    elif "label" in table.columns:
        summary = multiclass_labelled_summary(predictor, table)
    result = {
        "model": str(Path(model)),
        "kind": predictor.kind,
        "members": [str(m.folder) for m in predictor.members],
        "threshold": predictor.threshold,
        "decision": predictor.decision,
        "images": int(len(table)),
        "cropped": bool(recipe),
        "out": str(out),
        "labelled": summary,
    }
    write_text_atomic(out, table.to_csv(index=False))
    if summary is not None:
        write_text_atomic(sibling(out, ".metrics.json"), json.dumps(result, indent=2))
        write_text_atomic(sibling(out, ".summary.md"), render_labelled_summary(summary, f"{predictor.kind} ({len(predictor.members)} model(s))"))
    return result


def sibling(out: Path, suffix: str) -> Path:
    """``preds.csv`` -> ``preds<suffix>`` beside it."""
    return out.with_name(out.stem + suffix)
