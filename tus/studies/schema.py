"""A study file's schema: arms, their stage configs and overrides, the table to render, variables."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from tus.config import ConfigError, from_dict, load_yaml
from tus.data.markers import MarkerConfig

PRETRAIN_ROOT = "_pretrain"


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
class ArmConfig:
    """One row of the table: its cells, and its overrides of the study's stage configs.

    ``pretrain`` absent (None): fine-tune only. A list (even empty): pretrain with the study's
    pretraining config plus these overrides, then fine-tune from the exported encoder.
    """

    row: dict[str, Any] = field(default_factory=dict)
    pretrain: list[str] | None = None
    finetune: list[str] = field(default_factory=list)


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
class StageOverrides:
    pretrain: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)


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
    # Overrides every arm gets before its own.
    finetune: list[str] = field(default_factory=list)
    pretrain: list[str] = field(default_factory=list)
    marker_eval: MarkerEvalConfig | None = None
    table: TableConfig = field(default_factory=TableConfig)
    shrink: StageOverrides = field(default_factory=StageOverrides)
    arms: dict[str, ArmConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # from_dict leaves mapping values raw; build (and strictly check) each arm here.
        self.arms = {name: arm if isinstance(arm, ArmConfig) else from_dict(ArmConfig, arm, f"arms.{name}") for name, arm in self.arms.items()}
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
                raise ConfigError(f"{where}.row: needs exactly the table's columns {self.table.columns}; missing {sorted(set(self.table.columns) - cells)}, unknown {sorted(cells - set(self.table.columns))}")
            if arm.pretrain is not None:
                if self.pretrain_config is None:
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
        return (self.path.parent / relative).resolve()

    def output_dir(self, out: Path, shrink: bool) -> Path:
        return Path(out) / f"{self.name}{SHRINK_SUFFIX if shrink else ''}"


def load_study(path: str | Path) -> Study:
    """Read and validate a study file (its ``base:`` files merged first)."""
    path = Path(path)
    try:
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
