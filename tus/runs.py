"""What every stage shares to run a Lightning fit: trainer/logging configs, run dirs, loggers.

Each stage (fine-tuning, pretraining, diffusion) writes into its own new run directory:
``config.yaml`` (the resolved config), ``metrics.csv`` (CSV logger; a resumed run appends),
``checkpoints/`` and, when enabled, a W&B run whose id is kept in ``wandb_id.txt`` so a
resumed run continues the same W&B run.
"""

from __future__ import annotations

import csv
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from tus.config import to_dict, write_text_atomic


@dataclass
class TrainerConfig:
    """The Lightning Trainer options tus exposes (the rest keep Lightning's defaults)."""

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_epochs: int = 30
    max_steps: int = -1
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    deterministic: bool = False
    enable_progress_bar: bool = True
    limit_train_batches: float | int = 1.0
    limit_val_batches: float | int = 1.0
    check_val_every_n_epoch: int = 1
    val_check_interval: float | int | None = None


@dataclass
class LoggingConfig:
    """Experiment tracking. W&B is offline unless WANDB_MODE or ``mode`` says otherwise."""

    wandb: bool = True
    project: str = "tus"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["offline", "online", "disabled"] | None = None


class _AppendingExperimentWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (Lightning's writer deletes it) and extends its header."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))


class AppendingCSVLogger(CSVLogger):
    """A CSV logger whose ``metrics.csv`` survives a resume: new rows are appended."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_mode(config: LoggingConfig) -> str:
    """The W&B mode: the user's WANDB_MODE wins, then the config, then offline."""
    return os.environ.get("WANDB_MODE") or config.mode or "offline"


def new_run_dir(root: str | Path, name: str) -> Path:
    """Create and return a fresh ``root/<timestamp>-<name>`` folder (never reuses one)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        suffix = f"-{attempt}" if attempt else ""
        candidate = root / f"{stamp}-{name}{suffix}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {root}")


def resolve_run_dir(output_root: str | Path, name: str, run_dir: str | Path | None, env_var: str) -> Path:
    """The given run dir (resume), the one rank 0 made (a DDP worker process), or a new one.

    Lightning's "ddp" strategy re-runs the command in each worker process; rank 0 publishes
    its run dir in ``env_var`` so the workers join it instead of each making a new one.
    """
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: run directory to resume not found")
        return run_dir
    inherited = os.environ.get(env_var)
    if inherited and rank_zero_only.rank > 0:
        return Path(inherited)
    return new_run_dir(output_root, name)


def build_loggers(
    run_dir: Path, logging: LoggingConfig, *, name: str, config: dict, tags: list[str] = ()
) -> list[Logger]:
    """A CSV logger always, plus a W&B logger (resumable by the id kept in the run dir)."""
    loggers: list[Logger] = [AppendingCSVLogger(save_dir=str(run_dir), name="", version="")]
    mode = wandb_mode(logging)
    if logging.wandb and mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
        loggers.append(WandbLogger(
            project=logging.project,
            entity=logging.entity,
            group=logging.group,
            job_type=logging.job_type,
            tags=[*logging.tags, *tags],
            name=name,
            id=run_id,
            resume="allow",
            save_dir=str(run_dir),
            mode=mode,
            config=config,
        ))
    return loggers


def build_trainer(
    trainer: TrainerConfig,
    run_dir: Path,
    *,
    loggers: list[Logger],
    callbacks: list[Callback] = (),
    checkpoint_every_n_steps: int | None = None,
) -> L.Trainer:
    """A Trainer writing checkpoints (``last.ckpt`` for resume) under ``run_dir/checkpoints``."""
    checkpoint = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        save_last=True,
        save_top_k=0,
        every_n_train_steps=checkpoint_every_n_steps,
    )
    all_callbacks: list[Callback] = [checkpoint, *callbacks]
    if trainer.enable_progress_bar:
        all_callbacks.append(TQDMProgressBar(refresh_rate=1))
    if loggers:
        all_callbacks.append(LearningRateMonitor(logging_interval="step"))
    options = to_dict(trainer)
    # Pass only what differs from Lightning's defaults: an explicit default makes Lightning
    # print a notice for each (e.g. "limit_train_batches=1.0 was configured").
    for name, default in (("limit_train_batches", 1.0), ("limit_val_batches", 1.0), ("val_check_interval", None)):
        if options[name] == default:
            del options[name]
    return L.Trainer(
        **options,
        logger=loggers,
        callbacks=all_callbacks,
        default_root_dir=str(run_dir),
        enable_model_summary=False,
    )


def last_checkpoint(run_dir: Path) -> Path | None:
    """``run_dir/checkpoints/last.ckpt`` if a previous attempt left one (for resume)."""
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None where the file does not exist (yet)."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON, atomically (see :func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(data, indent=2))
