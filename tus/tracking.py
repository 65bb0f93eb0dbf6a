"""W&B as the dashboard that compares runs: provenance in every run's config, artifacts with
lineage, and one summary run per CV and per study.

What a W&B workspace gets from tus (offline by default, see :func:`tus.runs.wandb_mode`):

- every stage's runs are grouped (``group`` = the study/arm or ``logging.group``) and typed
  (``job_type`` = the stage), and a fine-tuning run's config carries ``provenance``: the
  initialisation (``model.init``), the encoder's pretraining run and its method, so the runs
  table can group by them;
- artifacts: the pretraining pool's manifests and the labelled manifest (named by content
  hash, ``pool-<hash>``, ``labels-<hash>``), the encoder export (``encoder-<pretrain run>``),
  each fold model (``model-<cv run>-fold<F>-seed<S>``), the CV's pooled test predictions
  (``predictions-<cv run>``);
- lineage: a pretraining run *logs* its encoder and *uses* its pool; a CV's summary run
  *uses* the encoder and the labelled manifest and *logs* the fold models and predictions,
  so the lineage graph reads pool -> pretraining -> encoder -> CV -> models/predictions;
- one summary run per CV (``job_type`` ``cv-summary``: mean ± std and CIs as summary
  metrics, a table of the fold x seed runs, ROC/PR/confusion through ``wandb.plot``, the
  figures) and one per study (``study-summary``: the arms' table and the forest plots).
- the stages after training log too, each in its output folder: the diffusion run its EMA
  export (``diffusion-<run>``); ``sample`` uses it and logs the folder (``samples-<hash>``);
  ``filter`` uses that and logs the kept set (``filtered-<hash>``); ``noisy-labels`` uses the
  labelled manifest and logs its flag table (``flags-<hash>`` and a W&B table); ``explain`` uses
  the fold model it explained and logs a few overlay pages. The same files always give the
  same artifact name and digest, so a later stage's use matches an earlier stage's log.

W&B cannot *use* an artifact offline, so every use and log is also written to the run dir's
``wandb_lineage.jsonl`` (one JSON object per line: run id, ``use``/``log``, name, type, digest);
``tus wandb export`` syncs the offline runs and then replays the uses online, which draws the
lineage edges. Runs are quiet: no banner, no console capture; each run tus starts prints one
line saying where it is and how to upload it (:func:`announce`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tus.run_config import LoggingConfig
from tus.runs import wandb_mode

LINEAGE_FILE = "wandb_lineage.jsonl"
SUMMARY_ID_FILE = "wandb_summary_id.txt"


def enabled(logging: LoggingConfig) -> bool:
    return bool(logging.wandb) and wandb_mode(logging) != "disabled"


def quiet_environment() -> None:
    """No W&B banner or "syncing" lines (a stage's log says where its runs are)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")


def artifact_name(prefix: str, text: str) -> str:
    """A W&B artifact name (letters, digits, ``-_.``) from a prefix and a run or file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{prefix}-{text}").strip("-")[:120]


def content_hash(paths: Iterable[Path]) -> str:
    """SHA-256 (first 12 hex digits) over the files' names and bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def encoder_provenance(init: str, weights: str | None) -> dict[str, Any]:
    """The initialisation (``init``, as ``model.init``), and for a tus encoder export its
    pretraining run, method and steps (read from the export's ``config.json``): a run config's
    ``provenance`` block, for the runs table to group by (``provenance.encoder_method``)."""
    record: dict[str, Any] = {"init": init, "encoder_run": None, "encoder_method": None, "encoder_steps": None}
    folder = Path(weights) if weights else None
    if folder is not None and folder.is_file():
        folder = folder.parent
    config = folder / "config.json" if folder is not None else None
    if config is not None and config.is_file():
        meta = json.loads(config.read_text())
        extra = meta.get("extra", meta)
        record.update({"encoder_run": extra.get("pretrain_run"), "encoder_method": extra.get("method"), "encoder_steps": extra.get("steps")})
    return record


def start_run(run_dir: Path, logging: LoggingConfig, *, name: str, job_type: str, config: dict | None = None, id_file: str = SUMMARY_ID_FILE, tags: Iterable[str] = ()):
    """A W&B run of its own in ``run_dir`` (resumable by the id kept in ``id_file``), or None
    when W&B is off. Used for the summary runs and for artifacts written after a stage's
    training run has finished."""
    if not enabled(logging):
        return None
    quiet_environment()
    import uuid

    import wandb

    id_path = run_dir / id_file
    run_id = id_path.read_text().strip() if id_path.is_file() else uuid.uuid4().hex[:8]
    id_path.write_text(run_id)
    run = wandb.init(
        project=logging.project,
        entity=logging.entity,
        group=logging.run_group(),
        job_type=job_type,
        name=name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=wandb_mode(logging),  # type: ignore[arg-type]  # a checked WANDB_MODE string
        config=config or {},
        tags=[*logging.tags, *tags],
        reinit="create_new",
        settings=wandb.Settings(silent=True, console="off", quiet=True),
    )
    announce(run, run_dir, job_type)
    return run


def announce(run: Any, run_dir: Path, job_type: str) -> None:
    """The one line a W&B run prints (W&B's own banner is off): where an offline run is and how
    to upload it, or the online run's page."""
    if run.settings.mode == "online":
        print(f"W&B {job_type} run {run.name}: {run.url}", flush=True)
    else:
        print(f"W&B {job_type} run {run.name}: offline in {Path(run.dir).parent}; upload with: tus wandb export {run_dir}", flush=True)


def file_artifact(name: str, kind: str, files: Iterable[Path] | Path, metadata: dict | None = None, *, images_in_place: bool = False):
    """An artifact of files (or a folder); the same files give the same digest on every machine.

    ``images_in_place``: image files are referenced where they are instead of copied into W&B's
    staging folder (a sample folder holds thousands; tus never rewrites an image it wrote, while
    bookkeeping files such as a growing ``manifest.csv`` are still copied)."""
    import wandb

    from tus.data.images import IMAGE_SUFFIXES

    artifact = wandb.Artifact(name, type=kind, metadata=metadata or {})
    if isinstance(files, Path) and files.is_dir():
        artifact.add_dir(str(files))
    else:
        for path in [files] if isinstance(files, Path) else files:
            in_place = images_in_place and Path(path).suffix.lower() in IMAGE_SUFFIXES
            artifact.add_file(str(path), name=Path(path).name, policy="immutable" if in_place else "mutable")
    return artifact


def _record(run_dir: Path, run: Any, direction: str, artifact: Any) -> None:
    row = {"run_id": run.id, "project": run.project, "direction": direction, "name": artifact.name.split(":")[0], "type": artifact.type, "digest": artifact.digest}
    with (run_dir / LINEAGE_FILE).open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def log_artifact(run: Any, run_dir: Path, artifact: Any) -> None:
    """Log ``artifact`` as this run's output (works offline; uploaded by ``wandb sync``)."""
    run.log_artifact(artifact)
    _record(run_dir, run, "log", artifact)


def use_artifact(run: Any, run_dir: Path, artifact: Any) -> None:
    """Declare ``artifact`` an input of this run: online at once, offline in the lineage file
    (``tus wandb export`` replays it after syncing)."""
    if run.settings.mode == "online":
        run.use_artifact(artifact)
    _record(run_dir, run, "use", artifact)


def read_lineage(run_dir: Path) -> list[dict]:
    """Every artifact use and log recorded under ``run_dir`` (its own file and its runs')."""
    rows = []
    for path in sorted(Path(run_dir).rglob(LINEAGE_FILE)):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def offline_records(run_dir: Path) -> list[Any]:
    """The records (``wandb_internal_pb2.Record``) of every offline W&B run under ``run_dir``, read
    from their ``run-*.wandb`` transaction logs: to check what a run holds before syncing it.

    The log is W&B's LevelDB-style record log: a 7-byte file header, then 32 KiB blocks of
    chunks, each with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    records = []
    # ``run_dir`` may be a run dir, a study, or one ``offline-run-*`` folder itself.
    for path in sorted(p for p in Path(run_dir).rglob("run-*.wandb") if p.parent.name.startswith("offline-run-")):
        data, position, pending = path.read_bytes(), 7, b""
        while position + 7 <= len(data):
            if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[position : position + 7])
            if length == 0 and kind == 0:
                break
            pending += data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


# ---------------------------------------------------------------------------------------------
# Per stage


def _manifest_artifact(prefix: str, manifest: Path, metadata: dict | None = None):
    return file_artifact(artifact_name(prefix, content_hash([manifest])), "dataset", [manifest], {"manifest": str(manifest.resolve()), **(metadata or {})})


def _encoder_artifact(encoder_dir: Path):
    meta = encoder_provenance("tus", str(encoder_dir))
    files = sorted(p for p in encoder_dir.iterdir() if p.is_file())
    return file_artifact(artifact_name("encoder", meta["encoder_run"] or encoder_dir.parent.name), "model", files, {k: v for k, v in meta.items() if v is not None})


def track_pretraining(run_dir: Path, logging: LoggingConfig, manifests: list[Path], name: str, config: dict) -> None:
    """The pretraining run's lineage: it used its pool's manifests and produced the encoder."""
    run = start_run(run_dir, logging, name=name, job_type=logging.job_type or "pretrain", config=config, id_file="wandb_id.txt")
    if run is None:
        return
    for manifest in manifests:
        use_artifact(run, run_dir, _manifest_artifact("pool", manifest))
    if (run_dir / "encoder").is_dir():
        log_artifact(run, run_dir, _encoder_artifact(run_dir / "encoder"))
    run.finish()


def track_cv(run_dir: Path, logging: LoggingConfig, *, name: str, manifest: Path, init: str, weights: str | None, config: dict) -> None:
    """One summary run per CV: its inputs (labelled manifest, encoder), each fold model and the
    pooled predictions as artifacts, mean ± std and CIs as summary metrics, a table with one row
    per fold x seed run, ROC/PR/confusion through ``wandb.plot`` and the figures."""
    import pandas as pd

    provenance = encoder_provenance(init, weights)
    run = start_run(run_dir, logging, name=f"{name}-summary", job_type="cv-summary", config={**config, "provenance": provenance})
    if run is None:
        return
    import wandb

    use_artifact(run, run_dir, _manifest_artifact("labels", manifest))
    if weights and Path(weights).is_dir() and (Path(weights) / "config.json").is_file():
        use_artifact(run, run_dir, _encoder_artifact(Path(weights)))
    for fold_dir in sorted((run_dir / "runs").glob("fold*-seed*")):
        artifact = _fold_model_artifact(run_dir, fold_dir, provenance)
        if artifact is not None:
            log_artifact(run, run_dir, artifact)
    predictions = sorted((run_dir / "runs").glob("*/predictions.csv"))
    if predictions:
        artifact = wandb.Artifact(artifact_name("predictions", run_dir.name), type="predictions", metadata={"cv_run": run_dir.name, **provenance})
        for path in predictions:
            artifact.add_file(str(path), name=f"{path.parent.name}/predictions.csv")
        log_artifact(run, run_dir, artifact)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    for metric, stats in (summary.get("metrics") or {}).items():
        run.summary[f"{metric}/mean"] = stats["mean"]
        run.summary[f"{metric}/std"] = stats["std"]
    for metric, ci in (summary.get("ci") or {}).items():
        run.summary[f"{metric}/ci_low"] = ci["low"]
        run.summary[f"{metric}/ci_high"] = ci["high"]
    runs_csv = run_dir / "runs.csv"
    logged: dict[str, Any] = {}
    if runs_csv.is_file() and runs_csv.stat().st_size > 1:
        logged["runs"] = wandb.Table(dataframe=pd.read_csv(runs_csv))
    pooled = _pooled(run_dir)
    if len(pooled) and pooled["label"].nunique() == 2:
        probabilities = pooled[["prob"]].assign(negative=1 - pooled["prob"])[["negative", "prob"]].to_numpy()
        labels = pooled["label"].astype(int).to_numpy()
        logged["roc"] = wandb.plot.roc_curve(labels, probabilities, labels=["0", "1"], classes_to_plot=[1])  # type: ignore[list-item]
        logged["pr"] = wandb.plot.pr_curve(labels, probabilities, labels=["0", "1"], classes_to_plot=[1])  # type: ignore[list-item]
        logged["confusion"] = wandb.plot.confusion_matrix(y_true=labels.tolist(), preds=pooled["pred"].astype(int).tolist(), class_names=["0", "1"])
    for png in sorted((run_dir / "figures").glob("*.png")):
        logged[f"figures/{png.stem}"] = wandb.Image(str(png))
    if logged:
        run.log(logged)
    run.finish()


def _fold_model_artifact(cv_dir: Path, fold_dir: Path, provenance: dict):
    """A CV's fold model (``model-<cv run>-fold<F>-seed<S>``): what its summary run logs and
    ``tus explain`` uses."""
    files = [p for p in (fold_dir / "model.safetensors", fold_dir / "model.json", fold_dir / "config.json", fold_dir / "metrics.json") if p.is_file()]
    files += sorted(fold_dir.glob("model*.json"))
    if not files:
        return None
    return file_artifact(artifact_name("model", f"{cv_dir.name}-{fold_dir.name}"), "model", sorted(set(files)), {"cv_run": cv_dir.name, "run": fold_dir.name, **provenance})


def _pooled(run_dir: Path):
    import pandas as pd

    if not (run_dir / "folds.csv").is_file():
        return pd.DataFrame(columns=["label", "prob", "pred"])
    from tus.figures.runs import cv_predictions

    return cv_predictions(run_dir)


def track_study(study_dir: Path, logging: LoggingConfig, *, name: str) -> None:
    """One summary run per study: the arms' table and the forest plots."""
    import pandas as pd

    run = start_run(study_dir, logging, name=f"{name}-summary", job_type="study-summary", config={"study": name})
    if run is None:
        return
    import wandb

    logged: dict[str, Any] = {}
    if (study_dir / "table.csv").is_file():
        logged["arms"] = wandb.Table(dataframe=pd.read_csv(study_dir / "table.csv"))
    for png in sorted((study_dir / "figures").glob("forest_*.png")):
        logged[f"figures/{png.stem}"] = wandb.Image(str(png))
    if logged:
        run.log(logged)
    run.finish()


def track_diffusion(run_dir: Path, logging: LoggingConfig, manifests: list[Path], name: str, config: dict) -> None:
    """The diffusion run's lineage: it used its pool's manifests and produced the EMA U-Net export
    (``diffusion-<run>``, the artifact a ``tus sample`` folder uses)."""
    from tus.methods.iddpm import latest_export

    export = latest_export(run_dir)
    run = start_run(run_dir, logging, name=name, job_type=logging.job_type or "diffusion", config=config, id_file="wandb_id.txt")
    if run is None:
        return
    for manifest in manifests:
        use_artifact(run, run_dir, _manifest_artifact("pool", manifest))
    if export is not None:
        log_artifact(run, run_dir, _diffusion_artifact(export))
    run.finish()


def _diffusion_artifact(export: Path):
    """A diffusion export (its ``ema_unet_step*`` folder or old weights file), named after its run."""
    files = sorted(p for p in export.iterdir() if p.is_file()) if export.is_dir() else [export, export.with_suffix(".json")]
    return file_artifact(artifact_name("diffusion", export.parent.parent.name), "model", [p for p in files if p.is_file()], {"export": export.name})


def _image_folder_artifact(prefix: str, folder: Path, extra: Iterable[str] = ()):
    """A folder of images with its bookkeeping files (``extra`` names beside the images), named
    by their content hash: the same folder gives the same artifact in every stage that reads it."""
    from tus.data.images import list_images

    files = list_images(folder) + [folder / name for name in extra if (folder / name).is_file()]
    return file_artifact(artifact_name(prefix, content_hash(files)), "dataset", files, {"folder": str(folder.resolve()), "images": len(list_images(folder))}, images_in_place=True)


SAMPLE_FILES = ("manifest.csv", "sampling.json")


def track_sample(out_dir: Path, settings: dict, source: Path, logging: LoggingConfig | None = None) -> None:
    """A ``tus sample`` folder's run (``job_type`` ``sample``): it used the diffusion export it
    sampled from (when ``source`` lies in an export folder) and logs the folder as an artifact."""
    logging = logging or LoggingConfig()
    run = start_run(out_dir, logging, name=out_dir.name, job_type="sample", config=settings, id_file="wandb_id.txt")
    if run is None:
        return
    if source.parent.name.startswith("ema_unet_step"):
        use_artifact(run, out_dir, _diffusion_artifact(source.parent))
    samples = _image_folder_artifact("samples", out_dir, SAMPLE_FILES)
    log_artifact(run, out_dir, samples)
    run.summary["images"] = samples.metadata["images"]
    run.finish()


def track_filter(out_dir: Path, report: dict, generated: Path, real: Path, logging: LoggingConfig | None = None) -> None:
    """A ``tus filter`` run (``job_type`` ``filter``): it used the generated folder (the sample
    artifact, same name and digest as ``tus sample`` logged) and logs the kept set."""
    logging = logging or LoggingConfig()
    config = {key: report[key] for key in ("k", "extractor", "link", "num_real") if key in report}
    run = start_run(
        out_dir, logging, name=out_dir.name, job_type="filter", config={**config, "per_class": "per_class" in report, "generated": str(generated), "real": str(real)}, id_file="wandb_id.txt"
    )
    if run is None:
        return
    use_artifact(run, out_dir, _image_folder_artifact("samples", generated, SAMPLE_FILES))
    if real.is_file():
        with real.open() as handle:
            header = handle.readline().strip().split(",")
        use_artifact(run, out_dir, _manifest_artifact("labels" if "label" in header else "pool", real))
    kept = [p for p in (out_dir / "manifest.csv", out_dir / "filter.csv", out_dir / "filter.json") if p.is_file()]
    artifact = file_artifact(artifact_name("filtered", content_hash(kept)), "dataset", kept, {"kept": report.get("kept"), "k": report.get("k")})
    for image in sorted((out_dir / "images").iterdir()) if (out_dir / "images").is_dir() else []:
        artifact.add_file(str(image), name=f"images/{image.name}", policy="immutable")  # where manifest.csv lists it
    log_artifact(run, out_dir, artifact)
    for key in ("kept", "rejected", "num_generated"):
        if key in report:
            run.summary[key] = report[key]
    run.finish()


def track_noisy_labels(out_dir: Path, manifest: Path, logging: LoggingConfig | None = None) -> None:
    """A noisy-label run (``job_type`` ``noisy-labels``): it used the labelled manifest (the
    ``labels-<hash>`` artifact the CVs used) and logs its flag table, as a W&B table and an
    artifact with the filtered and flipped manifests, and its figures."""
    import pandas as pd

    logging = logging or LoggingConfig()
    report = json.loads((out_dir / "report.json").read_text())
    run = start_run(out_dir, logging, name=out_dir.name, job_type="noisy-labels", config={"rule": report["rule"], "manifest": str(manifest)}, id_file="wandb_id.txt")
    if run is None:
        return
    import wandb

    use_artifact(run, out_dir, _manifest_artifact("labels", manifest))
    files = [out_dir / name for name in ("flag_counts.csv", "flagged.csv", "manifest_filtered.csv", "manifest_flipped.csv", "report.json")]
    log_artifact(run, out_dir, file_artifact(artifact_name("flags", content_hash(files)), "flags", files, {"flagged": report["flagged"], "rule": report["rule"]}))
    logged: dict[str, Any] = {"flags": wandb.Table(dataframe=pd.read_csv(out_dir / "flag_counts.csv"))}
    for png in sorted(out_dir.glob("*.png")):
        logged[f"figures/{png.stem}"] = wandb.Image(str(png))
    run.log(logged)
    run.summary["flagged"] = report["flagged"]
    run.summary["samples"] = report["samples"]
    run.finish()


EXPLAIN_IMAGES = 3


def track_explain(out_dir: Path, summary: dict, checkpoint: Path, logging: LoggingConfig | None = None) -> None:
    """A ``tus explain`` run (``job_type`` ``explain``): it used the fold model it explained (when
    ``checkpoint`` is a CV's fold model, the artifact its CV logged) and logs the first few
    overlay pages, the per-image table and the marker sensitivity as summary metrics."""
    import pandas as pd

    logging = logging or LoggingConfig()
    run = start_run(out_dir, logging, name=out_dir.name, job_type="explain", config={k: summary[k] for k in ("checkpoint", "image_size", "seed") if k in summary}, id_file="wandb_id.txt")
    if run is None:
        return
    import wandb

    fold_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if re.fullmatch(r"fold\d+-seed\d+", fold_dir.name) and fold_dir.parent.name == "runs":
        artifact = _fold_model_artifact(fold_dir.parent.parent, fold_dir, {})
        if artifact is not None:
            use_artifact(run, out_dir, artifact)
    logged: dict[str, Any] = {f"overlays/{png.stem}": wandb.Image(str(png)) for png in sorted(out_dir.glob("overlays-*.png"))[:EXPLAIN_IMAGES]}
    if (out_dir / "per_image.csv").is_file():
        logged["per_image"] = wandb.Table(dataframe=pd.read_csv(out_dir / "per_image.csv"))
    run.log(logged)
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            run.summary[key] = value
    run.finish()


def track_predict(out: Path, result: dict, logging: LoggingConfig | None = None) -> Path | None:
    """A ``tus predict`` run (``job_type`` ``predict``) in the folder ``<out stem>.wandb`` beside the
    predictions: it used the fold (or refit) models it ran (the artifacts their CV logged, so the lineage
    reads pretraining -> fine-tuning -> predictions) and logs the predictions CSV (and its metrics and
    summary when the images had labels) as an artifact, the metrics as summary values. The folder, or None."""
    logging = logging or LoggingConfig()
    if not enabled(logging):
        return None
    run_dir = out.parent / f"{out.stem}.wandb"
    run_dir.mkdir(exist_ok=True)
    config = {key: result[key] for key in ("model", "kind", "threshold", "images", "cropped") if key in result}
    run = start_run(run_dir, logging, name=out.stem, job_type="predict", config=config, id_file="wandb_id.txt")
    if run is None:
        return None
    for member in map(Path, result["members"]):
        if member.parent.name == "runs":
            artifact = _fold_model_artifact(member.parent.parent, member, {})
            if artifact is not None:
                use_artifact(run, run_dir, artifact)
    files = [out] + [p for p in (out.with_name(out.stem + ".metrics.json"), out.with_name(out.stem + ".summary.md")) if p.is_file()]
    log_artifact(run, run_dir, file_artifact(artifact_name("predictions", content_hash(files)), "predictions", files, {"model": result["model"], "images": result["images"]}))
    labelled = result.get("labelled") or {}
    for name, value in (labelled.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            run.summary[name] = value
    run.summary["images"] = result["images"]
    run.finish()
    return run_dir


# ---------------------------------------------------------------------------------------------
# Pushing offline runs later


def offline_run_folders(run_dirs: Iterable[Path]) -> list[Path]:
    """Every ``offline-run-*`` folder under the given run dirs (a run, a study, a demo folder)."""
    return sorted({folder for run_dir in run_dirs for folder in Path(run_dir).rglob("offline-run-*") if folder.is_dir()})


def export_offline(run_dirs: Iterable[Path], *, entity: str | None = None, dry_run: bool = False) -> list[str]:
    """Upload offline runs with their artifacts (``wandb sync``), then replay the artifact uses
    recorded in ``wandb_lineage.jsonl`` online (W&B cannot record a use offline), which draws
    the lineage edges. Returns the actions, one line each (only listed with ``dry_run``)."""
    import subprocess
    import sys

    run_dirs = [Path(p) for p in run_dirs]
    folders = offline_run_folders(run_dirs)
    uses = [row for run_dir in run_dirs for row in read_lineage(run_dir) if row["direction"] == "use"]
    actions = [f"sync {folder}" for folder in folders]
    actions += [f"use {row['name']}:latest ({row['type']}) in run {row['project']}/{row['run_id']}" for row in uses]
    if dry_run:
        return actions
    if folders:
        command = [sys.executable, "-m", "wandb", "sync", *(["--entity", entity] if entity else []), *map(str, folders)]
        subprocess.run(command, check=True)
    import wandb

    quiet_environment()
    for row in uses:
        run = wandb.init(project=row["project"], entity=entity, id=row["run_id"], resume="must", mode="online", reinit="create_new", settings=wandb.Settings(silent=True, console="off"))
        run.use_artifact(f"{row['name']}:latest", type=row["type"])
        run.finish()
    return actions
