"""Stage configs that load without torch or Lightning, so ``tus finetune-cv --help`` and
``--print_config`` answer at once: the stage modules re-export them
(``tus.stages.finetune_cv.FineTuneCVConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tus.callbacks.configs import GradCAMConfig
from tus.config import ConfigError, require_seeds
from tus.data.configs import LabeledDataConfig
from tus.eval.options import parse_threshold_rule
from tus.methods.configs import FineTuneOptimConfig
from tus.models.configs import BackboneConfig
from tus.run_config import LoggingConfig, TrainerConfig


@dataclass
class FineTuneCVConfig:
    """Everything ``tus finetune-cv`` runs: data, model, optimiser, trainer, protocol."""

    name: str = "finetune"
    output_root: str = "runs"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    # "last": test the last epoch; "inner_val": test the best epoch on an inner split of the
    # training folds. The test fold never takes part in model selection.
    selection: Literal["last", "inner_val"] = "last"
    selection_metric: str = "val/auroc"
    # A short name for the initialisation, recorded with each run (e.g. for noisy-label runs).
    init_label: str = ""
    record_losses: bool = True
    # The CV's figures (ROC, PR, confusion, calibration, training curves; PNG + PDF) at the end.
    # false skips them (smoke runs, sweeps: ~2-7 s of a short CV); `tus report RUN_DIR` draws
    # the same figures later from the run's files.
    figures: bool = True
    # After the folds: one final model per seed on every labelled image, same recipe and epochs
    # (runs/refit-seed<S>; never evaluated: its expected performance is the CV's).
    refit: bool = False
    # Decision threshold of the exported models: a number, "youden", "sensitivity=R" or "specificity=R",
    # chosen on out-of-fold predictions of each model's training folds (tus.stages.cv_decision).
    threshold: str = "0.5"
    # "temperature": temperature scaling fitted the same way; "none": raw softmax probabilities.
    calibration: Literal["none", "temperature"] = "none"
    gradcam: GradCAMConfig = field(default_factory=GradCAMConfig)
    data: LabeledDataConfig = field(default_factory=LabeledDataConfig)
    model: BackboneConfig = field(default_factory=BackboneConfig)
    optim: FineTuneOptimConfig = field(default_factory=FineTuneOptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        require_seeds("seeds", *self.seeds)
        try:
            parse_threshold_rule(self.threshold)
        except ValueError as error:
            raise ConfigError(str(error)) from None
