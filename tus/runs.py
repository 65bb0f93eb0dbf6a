"""What every stage shares to run a Lightning fit: trainer/logging configs, run dirs, loggers.

Each stage (fine-tuning, pretraining, diffusion) writes into its own new run directory:
``config.yaml`` (the resolved config), ``metrics.csv`` (CSV logger; a resumed run appends),
``checkpoints/`` and, when enabled, a W&B run whose id is kept in ``wandb_id.txt`` so a
resumed run continues the same W&B run.
"""

from __future__ import annotations

import copy
import csv
import inspect
import json
import os
import time
import types
import typing
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
)
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from tus.callbacks.checkpoint import BackgroundCheckpointIO, ResumeCheckpoint, SafeCheckpointIO, remove_stale_partials, usable_checkpoint
from tus.callbacks.finite_loss import StopOnNonFiniteLoss, resolve_max_nonfinite_steps
from tus.callbacks.performance import ChannelsLast, CompileModel
from tus.callbacks.preemption import StopAtResumablePoint
from tus.callbacks.progress import StageProgressBar, active_stage_bar
from tus.config import (
    STORAGE_ERRNOS,
    ConfigError,
    changed_keys,
    process_alive,
    save_config,
    to_dict,
    write_text_atomic,
)
from tus.hardware import detect_caps, keep_opencv_on_calling_thread, resolve_precision
from tus.run_config import LoggingConfig, TrainerConfig

# Trainer arguments tus sets itself (run dir, loggers, callbacks, checkpointing) or that take
# objects rather than values; every other Lightning Trainer argument is a config option.
_TRAINER_MANAGED = {"logger", "callbacks", "plugins", "default_root_dir", "enable_checkpointing", "model_registry"}
# tus's defaults where they differ from Lightning's: precision by the hardware (issue 13), a
# bounded budget, quiet model summaries (one progress bar per stage).
_TUS_TRAINER_DEFAULTS: dict[str, Any] = {"precision": "auto", "max_epochs": 30, "log_every_n_steps": 10, "enable_model_summary": False, "enable_progress_bar": True, "devices": 1}
_PLAIN_TYPES = (int, float, str, bool, type(None))


def _config_type(annotation: Any) -> Any:
    """A Lightning annotation as a config type: object alternatives (Strategy, Profiler,
    timedelta, ...) are given by name, and int comes before float so ``1`` stays one batch."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    kept: list[Any] = []
    for member in members:
        origin = typing.get_origin(member)
        if member in _PLAIN_TYPES or origin in (list, typing.Literal):
            kept.append(member)
        elif origin is dict:
            continue
        elif str not in kept:
            kept.append(str)
    kept.sort(key=lambda m: {int: 0, float: 1}.get(m, 2))
    return kept[0] if len(kept) == 1 else typing.Union[tuple(kept)]  # noqa: UP007 (built at run time)


def _trainer_fields() -> list[tuple[str, Any, Any]]:
    """TrainerConfig's fields as derived from the installed Lightning's Trainer signature: what
    :class:`tus.run_config.TrainerConfig` (written out, so configs load without Lightning) must match."""
    fields_ = []
    for name, parameter in inspect.signature(L.Trainer.__init__).parameters.items():
        if name in ("self", *_TRAINER_MANAGED) or parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        default = _TUS_TRAINER_DEFAULTS.get(name, parameter.default)
        kind = str if name == "precision" else _config_type(parameter.annotation)
        fields_.append((name, kind, field(default_factory=lambda d=default: copy.deepcopy(d)) if isinstance(default, (list, dict)) else default))
    # Not Trainer arguments: tus compiles the model itself when asked, and converts
    # convolutional models and their batches to channels_last where that is faster.
    fields_.append(("compile", bool, False))
    fields_.append(("channels_last", typing.Union[bool, typing.Literal["auto"]], "auto"))  # noqa: UP007
    # Epoch-end resume checkpoints at most this often (tus.callbacks.checkpoint says why).
    fields_.append(("checkpoint_interval_s", float, 60.0))
    # Consecutive non-finite training losses tolerated before the run stops (tus.callbacks.finite_loss).
    fields_.append(("max_nonfinite_steps", typing.Union[int, typing.Literal["auto"]], "auto"))  # noqa: UP007
    return fields_


LIGHTNING_TRAINER_DEFAULTS = {name: p.default for name, p in inspect.signature(L.Trainer.__init__).parameters.items()}


class _AppendingExperimentWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (Lightning's writer deletes it) and extends its header.

    The first rows this writer saves mark where this attempt starts: rows already in the file
    at or past their step were logged by an attempt killed after its last checkpoint, and are
    about to be logged again, so they are dropped first (no duplicated steps after a resume).
    Both attempts log on the same schedule, so no row of the killed one lies between the
    checkpoint's step and the resumed attempt's first row.
    """

    def _check_log_dir_exists(self) -> None:
        self._resumed_from_file = self._fs.isfile(self.metrics_file_path)
        if self._resumed_from_file:
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))

    def save(self) -> None:
        if self._resumed_from_file and self.metrics:
            self._resumed_from_file = False
            self._drop_rows_from(min(int(row["step"]) for row in self.metrics))
        super().save()

    def _drop_rows_from(self, step: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
        if len(kept) == len(rows):
            return
        tmp = f"{self.metrics_file_path}.tmp"
        with self._fs.open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        self._fs.mv(tmp, self.metrics_file_path)


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


# The launching process publishes its run dir here: Lightning's "ddp" strategy re-runs the
# command in each worker process, which joins this dir instead of making its own.
RUN_DIR_ENV = "TUS_RUN_DIR"
LOCK_FILE = "run.lock"
CONFIG_CHANGES_FILE = "config_changes.yaml"
RENDEZVOUS_TIMEOUT_S = 300


class RunDirError(ValueError):
    """A run dir cannot be used: missing, locked by another process, or not a run dir."""


def check_output_root(root: str | Path) -> None:
    """Refuse an ``output_root`` where no run dir can be made, before a stage reads its data:
    a file, a read-only or full file system, a virtual one (``/proc``). A folder is made and
    removed there to find out; folders this made on the way are removed again."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"output_root {root}: is a file, not a folder; give a folder for the run dirs")
    missing = [p for p in [root, *root.absolute().parents] if not p.exists()]
    probe = root / f".tus-write-check-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        raise _cannot_make_run_dir(root, error) from error
    finally:
        for folder in missing:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break


def _cannot_make_run_dir(root: Path, error: OSError) -> RunDirError:
    reason = STORAGE_ERRNOS.get(error.errno or 0) or (os.strerror(error.errno) if error.errno else str(error))
    return RunDirError(f"output_root {root}: cannot create a run dir there: {reason.lower()}")


def new_run_dir(root: str | Path, name: str) -> Path:
    """Create and return a fresh ``root/<timestamp>-<name>`` folder (never reuses one).

    A root that is a file, read-only, full or on a virtual file system (``/proc``) is refused
    in one line naming ``output_root``, before any training."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"output_root {root}: is a file, not a folder; give a folder for the run dirs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            suffix = f"-{attempt}" if attempt else ""
            candidate = root / f"{stamp}-{name}{suffix}"
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    except OSError as error:
        raise _cannot_make_run_dir(root, error) from error
    raise RunDirError(f"output_root {root}: could not create a new run directory")


@contextmanager
def open_run(
    config: Any,
    *,
    output_root: str | Path,
    name: str,
    resume: str | Path | None = None,
    allow_config_change: bool = False,
    create: bool = False,
) -> Iterator[Path]:
    """The run skeleton every stage uses; yields the run dir.

    - New run: rank 0 creates ``output_root/<time>-<name>`` and saves the resolved config;
      other ranks join it (Lightning's relaunched workers through ``TUS_RUN_DIR``, torchrun's and srun's
      through a rendezvous file), so a 2-process run makes exactly one run dir.
    - Resume: the saved ``config.yaml`` must equal ``config``; a change is refused naming
      the changed keys, unless ``allow_config_change``, which records it in
      ``config_changes.yaml`` and saves the new config.
    - ``create``: ``resume`` names where a new run goes when it does not exist yet (a
      study's fixed layout); otherwise a missing ``resume`` dir is an error, never a new run.
    - Rank 0 holds ``run.lock`` (its pid) while the run is open: a second writer is refused.
    """
    rank = rank_zero_only.rank
    rendezvous: Path | None = None
    if resume is not None and create and not (Path(resume) / "config.yaml").is_file():
        run_dir = Path(resume)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, run_dir / "config.yaml")
    elif resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise RunDirError(f"{run_dir}: not a run dir to resume (no config.yaml)")
        if rank == 0:
            check_config_change(run_dir, config, allow_config_change)
    elif rank > 0:
        run_dir = _joined_run_dir(Path(output_root), name)
    else:
        run_dir = new_run_dir(output_root, name)
        save_config(config, run_dir / "config.yaml")
        rendezvous = _publish_for_torchrun(Path(output_root), name, run_dir)
    lock = RunLock(run_dir) if rank == 0 else None
    if lock:
        lock.acquire()
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        yield run_dir
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
        if lock:
            lock.release()
        if rendezvous is not None:  # every rank read it before training started
            rendezvous.unlink(missing_ok=True)


def check_config_change(run_dir: Path, config: Any, allow: bool) -> None:
    """Refuse (or, allowed, record) a resume whose config differs from the saved one."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    current = to_dict(config)
    changed = [key for key in changed_keys(saved, current) if not _added_since(key, saved, current, config)]
    if not changed:
        return
    if not allow:
        raise ConfigError(f"{run_dir}: the config differs from the one this run was started with ({', '.join(changed)}); resume without those overrides, add --allow-config-change, or start a new run")
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": {key: {"was": _dig(saved, key), "now": _dig(current, key)} for key in changed}}
    log = run_dir / CONFIG_CHANGES_FILE
    history = (yaml.safe_load(log.read_text()) or []) if log.is_file() else []
    write_text_atomic(log, yaml.safe_dump([*history, record], sort_keys=False))
    save_config(config, run_dir / "config.yaml")


_MISSING = object()


def _added_since(key: str, saved: dict, current: dict, config: Any) -> bool:
    """Whether ``key`` is an option a newer tus added (absent from the saved config) and left at
    its default: a run started before the option existed resumes without a config change."""
    tree: Any = saved
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            break
        tree = tree[part]
    else:
        return False  # the saved config has the key: a real change
    try:
        default = _dig(to_dict(type(config)()), key)
    except Exception:  # noqa: BLE001 - a config without defaults: treat the key as changed
        return False
    return default is not None and default == _dig(current, key)


def _dig(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _launch_key() -> tuple[str, int] | None:
    """(the job's key, its number of processes) when a launcher started every rank itself:
    torchrun (its run id and port) or SLURM's ``srun`` (job, step and restart: a requeued job
    keeps its id); None otherwise (Lightning's own launcher passes ``TUS_RUN_DIR`` instead)."""
    torchrun = os.environ.get("TORCHELASTIC_RUN_ID")
    if torchrun:
        return f"{torchrun}-{os.environ.get('MASTER_PORT', '')}", int(os.environ.get("WORLD_SIZE", "1"))
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_PROCID") is not None:
        step = os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID", ""))
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        return f"slurm{job}.{step}.{restart}", int(os.environ.get("SLURM_NTASKS", "1"))
    return None


def _rendezvous_file(output_root: Path, name: str) -> Path | None:
    """Where rank 0 of a torchrun or srun job tells its peers the run dir (None otherwise).
    ``output_root`` must be on a file system every rank sees (as the run dir must)."""
    launch = _launch_key()
    if launch is None:
        return None
    return output_root / f".rendezvous-{name}-{launch[0]}"


# Set (by the SLURM scripts in docker/): rank 0 writes the path of the run dir it made into
# this file, so a requeued job resumes that run dir instead of starting another.
RUN_DIR_FILE_ENV = "TUS_RUN_DIR_FILE"


def _publish_for_torchrun(output_root: Path, name: str, run_dir: Path) -> Path | None:
    """Rank 0's new run dir, for the other ranks (torchrun, srun) and for a requeued job."""
    record = os.environ.get(RUN_DIR_FILE_ENV)
    if record:
        write_text_atomic(Path(record), str(run_dir.resolve()) + "\n")
    launch = _launch_key()
    path = _rendezvous_file(output_root, name)
    if path is None or launch is None or launch[1] <= 1:
        return None
    write_text_atomic(path, str(run_dir))
    return path


def _joined_run_dir(output_root: Path, name: str) -> Path:
    """A worker's run dir: the one rank 0 made (inherited env var, or the torchrun/srun rendezvous)."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited)
    path = _rendezvous_file(output_root, name)
    if path is None:
        raise RunDirError(f"rank {rank_zero_only.rank}: no run dir from rank 0 ({RUN_DIR_ENV} unset, not under torchrun or srun)")
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while not path.is_file():
        if time.monotonic() > deadline:
            raise RunDirError(f"rank {rank_zero_only.rank}: rank 0 did not publish its run dir in {path} within {RENDEZVOUS_TIMEOUT_S} s (is {output_root} on a file system every node sees?)")
        time.sleep(0.2)
    return Path(path.read_text().strip())


class RunLock:
    """``run.lock`` holding the writer's pid: a second process writing the same run dir (or
    output folder) is refused with the holder's pid; a lock left by a killed process is taken over."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder != os.getpid() and process_alive(holder):
                    raise RunDirError(f"{self.path.parent}: in use by another tus process (pid {holder}); wait for it or use another folder") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(handle, "w") as file:
                file.write(str(os.getpid()))
            self.held = True
            return
        raise RunDirError(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def finish_loggers(loggers: list[Logger]) -> None:
    """End the W&B run of each W&B logger (a stage's run is over)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def build_loggers(run_dir: Path, logging: LoggingConfig, *, name: str, config: dict, tags: list[str] = ()) -> list[Logger]:
    """A CSV logger always, plus a W&B logger (resumable by the id kept in the run dir)."""
    loggers: list[Logger] = [AppendingCSVLogger(save_dir=str(run_dir), name="", version="")]
    mode = wandb_mode(logging)
    # W&B's banner would be printed for every fold x seed; the run dir says where runs are.
    os.environ.setdefault("WANDB_SILENT", "true")
    if logging.wandb and mode != "disabled":
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
        loggers.append(
            WandbLogger(
                project=logging.project,
                entity=logging.entity,
                group=logging.run_group(),
                job_type=logging.job_type,
                tags=[*logging.tags, *tags],
                name=name,
                id=run_id,
                resume="allow",
                save_dir=str(run_dir),
                mode=mode,
                config=config,
                # No copy of the console in the run and no wrapped stdout; no banner either way.
                settings=wandb.Settings(silent=True, console="off"),
            )
        )
        # Lightning passes anonymous=None, on which W&B warns that the setting has no effect.
        wandb_init = getattr(loggers[-1], "_wandb_init", None)
        if isinstance(wandb_init, dict):
            wandb_init.pop("anonymous", None)
    return loggers


def build_trainer(
    trainer: TrainerConfig,
    run_dir: Path,
    *,
    loggers: list[Logger],
    callbacks: list[Callback] = (),
    checkpoint_every_n_steps: int | None = None,
    resumes_mid_epoch: bool = False,
) -> L.Trainer:
    """A Trainer writing checkpoints (``last.ckpt`` for resume) under ``run_dir/checkpoints``:
    at epoch ends, at most every ``trainer.checkpoint_interval_s`` seconds, or every
    ``checkpoint_every_n_steps`` optimiser steps when given. On SIGTERM/SIGUSR1 it saves
    ``last.ckpt`` and stops at the next step (``resumes_mid_epoch``: the stage's data stream
    resumes exactly from any step) or the epoch's end (:mod:`tus.callbacks.preemption`)."""
    checkpoint = ResumeCheckpoint(run_dir / "checkpoints", every_n_train_steps=checkpoint_every_n_steps, min_interval_s=trainer.checkpoint_interval_s)
    options = trainer_options(trainer)
    stop_on_nan = StopOnNonFiniteLoss(resolve_max_nonfinite_steps(trainer.max_nonfinite_steps, options["precision"]))
    stop = StopAtResumablePoint("step" if resumes_mid_epoch else "epoch")
    all_callbacks: list[Callback] = [stop_on_nan, checkpoint, ChannelsLast(trainer.channels_last), *callbacks, stop]
    if trainer.compile:
        all_callbacks.append(CompileModel())
    if trainer.enable_progress_bar:
        all_callbacks.append(StageProgressBar(active_stage_bar(), desc=run_dir.name))
    if loggers:
        all_callbacks.append(LearningRateMonitor(logging_interval="step"))
    write_json_atomic(run_dir / "runtime.json", runtime_report(trainer, options["precision"]))
    # This process augments (num_workers 0) or forks the loader workers that do.
    keep_opencv_on_calling_thread()
    # A background thread writes the resume checkpoints while training goes on (Lightning
    # waits for the last write before the run ends), atomically in their own folder, and
    # reads them back without unpickling code (tus.callbacks.checkpoint).
    return L.Trainer(**options, logger=loggers, callbacks=all_callbacks, default_root_dir=str(run_dir), plugins=[BackgroundCheckpointIO(SafeCheckpointIO())])


def trainer_options(trainer: TrainerConfig) -> dict:
    """The keyword arguments for ``L.Trainer``: precision resolved for this hardware, and only
    values that differ from Lightning's defaults (an explicit default makes Lightning print a
    notice for each, e.g. "limit_train_batches=1.0 was configured")."""
    options = to_dict(trainer)
    options.pop("compile")
    options.pop("channels_last")
    options.pop("checkpoint_interval_s")
    options.pop("max_nonfinite_steps")
    options["precision"] = resolve_precision(str(options["precision"]), str(options["accelerator"]))
    return {name: value for name, value in options.items() if name == "precision" or value != LIGHTNING_TRAINER_DEFAULTS.get(name)}


_ANNOUNCED: set[str] = set()


def runtime_report(trainer: TrainerConfig, precision: str) -> dict:
    """What the run ran on: recorded in ``runtime.json`` and printed once."""
    caps = detect_caps()
    report = {
        "precision_requested": str(trainer.precision),
        "precision": precision,
        "cuda": caps.cuda,
        "cuda_bf16": caps.cuda_bf16,
        "cpu_native_bf16": caps.cpu_native_bf16,
        "torch": torch.__version__,
        "lightning": L.__version__,
    }
    if rank_zero_only.rank == 0 and str(trainer.precision) == "auto" and precision not in _ANNOUNCED:
        _ANNOUNCED.add(precision)  # once per process, not once per fold x seed
        print(f"precision: auto -> {precision}", flush=True)
    return report


def last_checkpoint(run_dir: Path) -> Path | None:
    """``run_dir/checkpoints/last.ckpt`` if a previous attempt left one (read-only use)."""
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a resumed stage continues from: ``last.ckpt`` if it loads, else the
    previous one (a corrupt one is set aside with a warning); None: start from the beginning.
    A checkpoint that would run code is refused (one line), whichever it is. Temp files that a
    killed attempt left mid-save (``.last.ckpt.partial-<pid>``) are removed first."""
    folder = Path(run_dir) / "checkpoints"
    if rank_zero_only.rank == 0:  # the only rank that writes checkpoints
        remove_stale_partials(folder)
    return usable_checkpoint(folder / "last.ckpt", set_aside=rank_zero_only.rank == 0)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None where the file does not exist (yet)."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON, atomically (see :func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(data, indent=2))
