"""A study file's schema: arms, their stage configs and overrides, the table to render, variables."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tus.config import ConfigError, build_config, from_dict, load_yaml, resolve_config_path, to_dict
from tus.data.configs import MarkerConfig

PRETRAIN_ROOT = "_pretrain"
# What `tus experiment run --stage` may run: every stage, only the arms' pretraining, or only fine-tuning.
STAGES = ("all", "pretrain", "finetune")


@dataclass(frozen=True)
class Metric:
    header: str
    better: Literal["higher", "lower"] | None


# Every metric a table may show: the CV test metrics and the marker-sensitivity ones.
MARKER_METRICS = {
    "clean_accuracy": Metric("Accuracy, clean (↑)", "higher"),
    "clean_f1": Metric("F1-Score, clean (↑)", "higher"),
    "marked_accuracy": Metric("Accuracy, + markers (↑)", "higher"),
    "marked_f1": Metric("F1-Score, + markers (↑)", "higher"),
    "flip_rate": Metric("Predictions flipped by markers (↓)", "lower"),
    "cam_mass_clean": Metric("CAM mass on marker pixels, clean", None),
    "cam_mass_marked": Metric("CAM mass on marker pixels, + markers (↓)", "lower"),
}


CV_METRICS = {
    "accuracy": Metric("Accuracy (↑)", "higher"),
    "f1": Metric("F1-Score (↑)", "higher"),
    "precision": Metric("Precision (↑)", "higher"),
    "recall": Metric("Recall (↑)", "higher"),
    "auroc": Metric("AUROC (↑)", "higher"),
}


class StudyError(ValueError):
    """A study cannot be planned or run; the message names the study file and arm."""


@dataclass
class StageOverrides:
    pretrain: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)
    # The per-fold generators of a study's ``synthetic:`` block: their diffusion config, and the
    # block's own keys (``per_class=8``, ``filter_k=2``).
    diffusion: list[str] = field(default_factory=list)
    synthetic: list[str] = field(default_factory=list)


@dataclass
class ArmConfig:
    """One row of the table: its cells, and its overrides of the study's stage configs.

    ``pretrain`` absent (None): fine-tune only. A list (even empty): pretrain with the study's
    pretraining config plus these overrides, then fine-tune from the exported encoder.
    """

    row: dict[str, Any] = field(default_factory=dict)
    pretrain: list[str] | None = None
    finetune: list[str] = field(default_factory=list)
    # An arm's own stage configs (relative to the study file), where its family needs one: a
    # ViT fine-tuning recipe, MAE instead of SimCLR pretraining. Default: the study's.
    finetune_config: str | None = None
    pretrain_config: str | None = None
    # Applied after the study's shrink overrides (e.g. method options of its own pretraining).
    shrink: StageOverrides | None = None
    # With the study's ``noisy_labels:`` block: fine-tune on the labelled set as it is, without
    # the flagged samples, or with their labels flipped; ``reference`` changes them in every
    # fold (the paper; its test folds saw the rule), ``fold_safe`` in the training folds only.
    labels: Literal["complete", "filtered", "flipped"] = "complete"
    label_protocol: Literal["reference", "fold_safe"] = "reference"
    # The study's ``exclude_labeled`` for this arm's pretraining pool (None: the study's).
    exclude_labeled: Literal["per_fold", "all", "none"] | None = None
    # With the study's ``synthetic:`` block: train on the real training folds only (none), on them
    # plus the fold's generated images (added), or on the generated images alone (only).
    synthetic: Literal["none", "added", "only"] = "none"


# How a pretraining pool is kept apart from the images an arm is tested on (StudyConfig.exclude_labeled).
POOL_EXCLUSIONS = ("per_fold", "all", "none")


@dataclass
class NoisyLabelsStudy:
    """A study's ``noisy_labels:`` block: before its arms, flag suspicious labels from the
    per-sample losses of fine-tuning CVs, one per initialisation (TesticulUS Sec. 3; thesis
    Sec. 3.2). ``inits`` maps a name to fine-tuning overrides (like an arm's ``finetune``);
    a sample is flagged when its loss exceeds ``threshold`` in >= ``min_exceed`` epochs in
    >= ``min_fraction`` of its evaluations. Arms then choose ``labels: filtered|flipped``.
    """

    inits: dict[str, list[str]] = field(default_factory=lambda: {"imagenet": ["model.init=timm"]})
    threshold: float = 1.0
    min_exceed: int = 3
    min_fraction: float = 1.0
    counting: Literal["per_epoch", "per_draw"] = "per_epoch"
    histogram_min_exceed: list[int] = field(default_factory=lambda: [1, 3, 5])


@dataclass
class SyntheticStudy:
    """A study's ``synthetic:`` block: fold-safe generated images for arms with ``synthetic: added|only``.

    For every test fold (and seed, when folds are drawn per seed) the runner trains one
    class-conditional diffusion model (``diffusion_config`` + ``diffusion`` overrides) on that fold's
    training patients only (``data.exclude_labeled=test_folds``), draws ``per_class`` images of
    each class (``sampler``, ``steps``, ``guidance``), keeps those inside their class's manifold
    of the fold's real training images (``tus filter --per-class`` with ``filter_k``; null: keep
    all) and gives them to fold k's training (``data.synthetic.source``). Cost: one diffusion
    training per fold (x seed) on top of the CVs.
    """

    diffusion_config: str = "../diffusion/paper.yaml"
    diffusion: list[str] = field(default_factory=list)
    per_class: int = 1000
    sampler: str = "respaced"
    steps: int | None = 250
    guidance: float = 1.0
    batch_size: int = 64
    filter_k: int | None = 20
    extractor: str = "inception"
    device: str = "auto"

    def with_overrides(self, overrides: list[str]) -> SyntheticStudy:
        """This block with ``key=value`` overrides (values parsed as YAML), e.g. a shrink's ``per_class=8``."""
        values = to_dict(self)
        for override in overrides:
            key, _, value = override.partition("=")
            if key.strip() not in values:
                raise ConfigError(f"synthetic: no key {key.strip()!r} (override {override!r}); keys: {', '.join(values)}")
            values[key.strip()] = yaml.safe_load(value)
        return build_config(SyntheticStudy, values, key_prefix="synthetic.")

    def __post_init__(self) -> None:
        if self.per_class < 1:
            raise ConfigError(f"synthetic.per_class must be >= 1, got {self.per_class}")
        if self.filter_k is not None and self.filter_k < 1:
            raise ConfigError(f"synthetic.filter_k must be >= 1 or null, got {self.filter_k}")


@dataclass
class TableConfig:
    """The table's descriptive ``columns`` (filled by each arm's ``row``) and metric columns.

    A row cell may contain ``{pretrain_images}``: the number of images the arm's pretraining
    pool held (from its ``pool.json``), written like the paper (1.66K).
    """

    columns: list[str] = field(default_factory=lambda: ["Arm"])
    metrics: list[str] = field(default_factory=lambda: ["accuracy", "f1"])
    digits: int = 2


@dataclass
class MarkerEvalConfig:
    """Marker sensitivity of every fold x seed model on its test fold (thesis Fig. 6.1).

    The markers of a test image depend only on (``seed``, fold), so every arm and seed is
    measured on the same marked images. ``overlay_images`` rows of Grad-CAM++ overlays are
    drawn for each arm's first run.
    """

    seed: int = 0
    batch_size: int = 32
    max_images: int | None = None
    overlay_images: int = 4
    device: str = "auto"  # "auto": the first GPU if there is one
    markers: MarkerConfig = field(default_factory=MarkerConfig)


@dataclass
class StudyConfig:
    """A study file. Config paths are relative to the study file; the study's name is its stem."""

    title: str = ""
    finetune_config: str = "../finetune/paper.yaml"
    pretrain_config: str | None = None
    # Re-draw the folds for each seed (the reference code), for every arm: the comparisons'
    # corrected resampled t-test assumes resampled splits. False shares one split across seeds
    # (then the table compares arms with a patient bootstrap of the pooled test predictions).
    folds_per_seed: bool = True
    # Overrides every arm gets before its own.
    finetune: list[str] = field(default_factory=list)
    pretrain: list[str] = field(default_factory=list)
    marker_eval: MarkerEvalConfig | None = None
    noisy_labels: NoisyLabelsStudy | None = None
    synthetic: SyntheticStudy | None = None
    table: TableConfig = field(default_factory=TableConfig)
    shrink: StageOverrides = field(default_factory=StageOverrides)
    # What an arm's pretraining pool leaves out of the labelled set it fine-tunes on (the labelled
    # images, their near duplicates and, where the pool has patient ids, their patients' images):
    # - per_fold: for each test fold, a pool without that fold's test patients, so one pretraining
    #   per fold and seed (folds_per_seed, the default), one per fold without it: K x seeds (or K) times the pretraining cost; fold k
    #   fine-tunes from fold k's encoder and refuses any other;
    # - all: one pool without any labelled patient, one pretraining for every fold (the cheap safe option);
    # - none: the pool as given (the reference: its test folds' images reach pretraining).
    exclude_labeled: Literal["per_fold", "all", "none"] = "per_fold"
    # Built per arm in __post_init__, so an error names the arm (arms.<name>.<key>).
    arms: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # from_dict leaves mapping values raw; build (and strictly check) each arm here.
        self.arms = {name: arm if isinstance(arm, ArmConfig) else build_config(ArmConfig, arm, key_prefix=f"arms.{name}.") for name, arm in self.arms.items()}
        known = {**CV_METRICS, **(MARKER_METRICS if self.marker_eval is not None else {})}
        unknown = [m for m in self.table.metrics if m not in known]
        if unknown:
            raise ConfigError(f"table.metrics: unknown metric(s) {unknown}; this study can show {sorted(known)}")
        for name, arm in self.arms.items():
            where = f"arms.{name}"
            if not NAME_PATTERN.match(name):
                raise ConfigError(f"{where}: arm names become folder names: use letters, digits, '_', '.', '-'")
            cells = set(arm.row)
            if cells != set(self.table.columns):
                raise ConfigError(
                    f"{where}.row: needs exactly the table's columns {self.table.columns}; missing {sorted(set(self.table.columns) - cells)}, unknown {sorted(cells - set(self.table.columns))}"
                )
            if arm.labels != "complete" and self.noisy_labels is None:
                raise ConfigError(f"{where}.labels: '{arm.labels}' needs the study's noisy_labels: block (which flags the samples)")
            if arm.synthetic != "none" and self.synthetic is None:
                raise ConfigError(f"{where}.synthetic: '{arm.synthetic}' needs the study's synthetic: block (which trains the per-fold generators)")
            if arm.synthetic != "none" and any(o.split("=", 1)[0].strip() in ("data.synthetic.source", "data.synthetic.only") for o in arm.finetune):
                raise ConfigError(f"{where}.finetune: data.synthetic.source/only are set by the runner for synthetic arms (per_class or ratio may be given)")
            if arm.label_protocol == "fold_safe" and arm.labels == "complete":
                raise ConfigError(f"{where}.label_protocol: fold_safe applies to labels: filtered or flipped")
            if arm.pretrain is not None:
                if (arm.pretrain_config or self.pretrain_config) is None:
                    raise ConfigError(f"{where}: pretrains, but the study names no pretrain_config")
                owned = [o for o in arm.finetune if o.split("=", 1)[0].strip() in ("model.init", "model.weights")]
                if owned:
                    raise ConfigError(f"{where}.finetune: {owned} — an arm that pretrains fine-tunes from its own encoder (model.init/model.weights are set by the runner)")


@dataclass
class Study:
    name: str
    path: Path
    config: StudyConfig

    def config_path(self, relative: str) -> Path:
        """A stage config named by the study: relative to the study file, else a packaged
        config of that name (so a study outside tus/configs can ``base:`` a packaged one)."""
        path = (self.path.parent / relative).resolve()
        if path.is_file():
            return path
        packaged = Path(*[part for part in Path(relative).parts if part not in ("..", ".")])
        try:
            return resolve_config_path(packaged)
        except ConfigError:
            return path

    def output_dir(self, out: Path, shrink: bool) -> Path:
        return Path(out) / f"{self.name}{SHRINK_SUFFIX if shrink else ''}"


def load_study(path: str | Path) -> Study:
    """Read and validate a study file, a path or a packaged name such as ``studies/tab2``
    (its ``base:`` files merged first)."""
    try:
        path = resolve_config_path(path)
        config = from_dict(StudyConfig, load_yaml(path))
    except (ConfigError, yaml.YAMLError) as error:
        raise StudyError(f"{path}: {error}") from error
    if not NAME_PATTERN.match(path.stem) or path.stem.startswith("_"):
        raise StudyError(f"{path}: the file name is the study's folder name: use letters, digits, '_', '.', '-'")
    return Study(path.stem, path, config)


def substitute(text: str, variables: Mapping[str, str], missing: set[str]) -> str:
    """Replace ``${NAME}`` / ``${NAME:-default}``; names without a value are added to ``missing``."""

    def value(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        try:
            return str(variables[name])
        except KeyError:
            if default is not None:
                return default
            missing.add(name)
            return match.group(0)

    return VARIABLE_PATTERN.sub(value, text)


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


VARIABLE_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


SHRINK_SUFFIX = "-shrink"
