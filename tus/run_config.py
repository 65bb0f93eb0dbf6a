"""The trainer and logging configs every stage shares, without importing Lightning or torch.

``TrainerConfig`` lists Lightning's Trainer arguments as plain config fields. It is written out
here (rather than derived from ``lightning.Trainer``'s signature at import time) so that
``tus <command> --help`` and ``--print_config`` need neither torch nor Lightning;
``tests/test_run_config.py`` checks that it still matches the installed Lightning's signature
(:func:`tus.runs.lightning_trainer_fields`), so a Lightning upgrade that adds, drops or retypes
an argument fails a test instead of drifting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from tus.config import ConfigError, require_at_least


@dataclass
class TrainerConfig:
    """Every Lightning Trainer argument (Lightning's defaults, except ``precision: auto``, which picks
    bf16/16-mixed/32-true from the hardware), plus ``compile`` (torch.compile the model), ``channels_last``
    (true/false/auto: auto converts convolutional models on GPUs and, on CPUs, where a timed trial of
    training steps measured it faster; see tus.callbacks.performance) and ``checkpoint_interval_s``
    (epoch-end resume checkpoints at most this often, in seconds of training; 0 = every epoch) and
    ``max_nonfinite_steps`` (consecutive NaN/inf training losses, or steps skipped by the 16-mixed gradient
    scaler, tolerated before the run stops with an error; auto: 25 under 16-mixed, else 0)."""

    accelerator: str = "auto"
    strategy: str = "auto"
    devices: int | list[int] | str = 1
    num_nodes: int = 1
    precision: str = "auto"
    fast_dev_run: int | bool = False
    max_epochs: int | None = 30
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    max_time: str | None = None
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    limit_predict_batches: int | float | None = None
    overfit_batches: int | float = 0.0
    val_check_interval: int | float | str | None = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = 10
    enable_progress_bar: bool | None = True
    enable_model_summary: bool | None = False
    accumulate_grad_batches: int = 1
    gradient_clip_val: int | float | None = None
    gradient_clip_algorithm: str | None = None
    deterministic: bool | Literal["warn"] | None = None
    benchmark: bool | None = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    profiler: str | None = None
    detect_anomaly: bool = False
    barebones: bool = False
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: int = 0
    enable_autolog_hparams: bool = True
    # Not Trainer arguments: tus compiles the model itself when asked, and converts
    # convolutional models and their batches to channels_last where that is faster.
    compile: bool = False
    channels_last: bool | Literal["auto"] = "auto"
    # Epoch-end resume checkpoints at most this often (tus.callbacks.checkpoint says why).
    checkpoint_interval_s: float = 60.0
    # Consecutive non-finite training losses tolerated before the run stops (tus.callbacks.finite_loss).
    max_nonfinite_steps: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        require_at_least(self, "trainer.", 0, "checkpoint_interval_s")
        if self.max_nonfinite_steps != "auto" and self.max_nonfinite_steps < 0:
            raise ConfigError(f"trainer.max_nonfinite_steps must be >= 0 or auto, got {self.max_nonfinite_steps}")


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

    def run_group(self) -> str | None:
        """``group``, else ``WANDB_RUN_GROUP`` read now: W&B reads its environment once per
        process, so a later run in the same process would lose a group set after the first."""
        return self.group or os.environ.get("WANDB_RUN_GROUP") or None
