"""``tus experiment``: run every arm of a study and render its table in the paper's shape.

A study (``experiments/studies/<name>.yaml``, schema :class:`StudyConfig`) names a fine-tuning
config and a pretraining config by path and lists its arms as overrides of them, so shared
settings are written once. An arm with a ``pretrain:`` list first pretrains an encoder and
then fine-tunes from it (``model.init=tus``); an arm without one only fine-tunes.

Override strings may use ``${NAME}`` / ``${NAME:-default}``: ``--set NAME=VALUE`` first, then
the environment, then the default. Substitution is textual, so a path inside a YAML flow
mapping is written quoted (``'data.sources=[{manifest: "${TUS_POOL}"}]'``).

Layout under ``--out`` (deterministic, so re-running resumes and skips finished work)::

    <out>/<study>/<arm>/arm.json         what the arm ran: resolved overrides, its pretraining run
    <out>/<study>/<arm>/finetune/        the arm's ``run_cv`` dir (folds x seeds, summary.json)
    <out>/<study>/<arm>/markers/         marker sensitivity of each fold x seed model (if asked)
    <out>/<study>/table.md, table.csv    the study's table
    <out>/_pretrain/<key>/               pretraining runs keyed by a hash of their config: arms of
                                         any study asking for the same pretraining share one run

``--shrink`` appends the study's ``shrink`` overrides (tiny CPU sizes) and writes to
``<out>/<study>-shrink/`` instead, so a smoke run never mixes with real results.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import pandas as pd
import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from sklearn.metrics import accuracy_score, f1_score

from tus.config import ConfigError, from_dict, load_config, load_yaml, to_dict
from tus.cv import FineTuneCVConfig, ResumeMismatchError, aggregate, run_cv
from tus.data.manifest import load_manifest
from tus.data.markers import MarkerConfig
from tus.explain import MarkerSensitivity, add_markers, load_images, measure_marker_sensitivity, save_overlay_grid
from tus.modules.finetune import load_finetuned
from tus.pretraining import PretrainConfig, run_pretraining
from tus.stage_callbacks import finetune_callbacks

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VARIABLE_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
PRETRAIN_ROOT = "_pretrain"
SHRINK_SUFFIX = "-shrink"
STAGES = ("all", "pretrain", "finetune")
# Trainer options that say where a run executes, not what it computes: a finished run is
# found again whatever they are now (a pretraining done as a 2-GPU job is reused by a later
# single-GPU invocation, e.g. `--stage finetune`).
LAUNCH_OPTIONS = ("accelerator", "devices", "num_nodes", "strategy", "enable_progress_bar")


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


@dataclass
class ArmPlan:
    """Everything one arm runs, fully resolved."""

    name: str
    dir: Path
    finetune: FineTuneCVConfig
    pretrain: PretrainConfig | None
    pretrain_dir: Path | None
    overrides: dict[str, list[str]]

    @property
    def finetune_dir(self) -> Path:
        return self.dir / "finetune"

    @property
    def markers_dir(self) -> Path:
        return self.dir / "markers"


def pretrain_key(config: PretrainConfig) -> str:
    """A hash of what a pretraining computes (not its name, logging or where it runs)."""
    data = to_dict(config)
    for name in ("name", "output_root", "logging"):
        data.pop(name)
    for name in LAUNCH_OPTIONS:
        data["trainer"].pop(name)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def plan_study(
    study: Study,
    out: str | Path,
    *,
    arms: list[str] | None = None,
    variables: Mapping[str, str] | None = None,
    shrink: bool = False,
    extra: StageOverrides | None = None,
) -> list[ArmPlan]:
    """Resolve every selected arm into configs (nothing runs); errors name study, arm and key.

    Override order, later wins: stage YAML <- study <- arm <- shrink <- ``extra`` (the
    command line); then the runner sets name, W&B group/job_type/tags and, for arms that
    pretrain, ``model.init=tus`` with the encoder's path.
    """
    config = study.config
    if not config.arms:
        raise StudyError(f"{study.path}: defines no arms")
    selected = list(config.arms) if not arms else arms
    unknown = [a for a in selected if a not in config.arms]
    if unknown:
        raise StudyError(f"{study.path}: no arm(s) {unknown}; arms: {', '.join(config.arms)}")
    variables = dict(os.environ) if variables is None else variables
    extra = extra or StageOverrides()
    shrunk = config.shrink if shrink else StageOverrides()
    out = Path(out)
    study_dir = study.output_dir(out, shrink)

    missing: dict[str, set[str]] = {}
    resolved: dict[str, dict[str, list[str] | None]] = {}
    for name in selected:
        arm = config.arms[name]
        names: set[str] = set()
        finetune = [substitute(o, variables, names) for o in [*config.finetune, *arm.finetune, *shrunk.finetune, *extra.finetune]]
        pretrain = None
        if arm.pretrain is not None:
            pretrain = [substitute(o, variables, names) for o in [*config.pretrain, *arm.pretrain, *shrunk.pretrain, *extra.pretrain]]
        for variable in names:
            missing.setdefault(variable, set()).add(name)
        resolved[name] = {"finetune": finetune, "pretrain": pretrain}
    if missing:
        lines = [f"  ${{{v}}} (arms: {', '.join(sorted(a))})" for v, a in sorted(missing.items())]
        raise StudyError(f"{study.path}: variable(s) not set:\n" + "\n".join(lines) + "\nexport them or pass --set NAME=VALUE")

    plans = []
    for name in selected:
        # A shrunk smoke run is grouped apart from the real one (tab2-shrink/ud vs tab2/ud).
        tags = [study.name, name, *(["shrink"] if shrink else [])]
        group = f"{study_dir.name}/{name}"
        pretrain_config = pretrain_dir = None
        if resolved[name]["pretrain"] is not None:
            pretrain_config = _load_stage(PretrainConfig, study, name, "pretrain", config.pretrain_config, resolved[name]["pretrain"])
            pretrain_dir = out / PRETRAIN_ROOT / pretrain_key(pretrain_config)
            pretrain_config = dataclasses.replace(
                pretrain_config,
                name=f"{study_dir.name}-{name}-pretrain",
                output_root=str(out / PRETRAIN_ROOT),
                logging=_tagged(pretrain_config.logging, group, "pretrain", tags),
            )
        finetune_config = _load_stage(FineTuneCVConfig, study, name, "finetune", config.finetune_config, resolved[name]["finetune"])
        model = finetune_config.model
        if pretrain_dir is not None:
            model = dataclasses.replace(model, init="tus", weights=str(pretrain_dir / "encoder.safetensors"))
        finetune_config = dataclasses.replace(
            finetune_config,
            name=f"{study_dir.name}-{name}",
            output_root=str(study_dir),
            model=model,
            logging=_tagged(finetune_config.logging, group, "finetune", tags),
        )
        plans.append(ArmPlan(name, study_dir / name, finetune_config, pretrain_config, pretrain_dir, resolved[name]))
    return plans


def _load_stage(cls, study: Study, arm: str, stage: str, relative: str, overrides: list[str]):
    path = study.config_path(relative)
    try:
        return load_config(cls, path, overrides)
    except (ConfigError, ValueError) as error:
        raise StudyError(f"{study.path}: arm '{arm}', {stage} ({path.name}): {error}") from error


def _tagged(logging, group: str, job_type: str, tags: list[str]):
    # group = study/arm and job_type = stage, so a W&B workspace groups an arm's folds x seeds;
    # tags add study, arm (and run_cv adds fold, seed) for filtering.
    return dataclasses.replace(logging, group=group, job_type=job_type, tags=[*logging.tags, *(t for t in tags if t not in logging.tags)])


def run_study(
    study: Study,
    out: str | Path,
    *,
    arms: list[str] | None = None,
    variables: Mapping[str, str] | None = None,
    shrink: bool = False,
    extra: StageOverrides | None = None,
    stage: str = "all",
) -> Path:
    """Run the selected arms (skipping finished work), then write the table; return the study dir.

    ``stage="pretrain"`` runs only the arms' pretraining (e.g. as a 2-GPU job),
    ``stage="finetune"`` only fine-tuning and evaluation (their pretraining must exist).
    """
    if stage not in STAGES:
        raise StudyError(f"stage must be one of {STAGES}, got {stage!r}")
    plans = plan_study(study, out, arms=arms, variables=variables, shrink=shrink, extra=extra)
    # Under DDP every rank runs this function (Lightning relaunches the command for ranks > 0;
    # torchrun and srun start every rank). All pretraining comes first, so once the
    # multi-device stages are over, ranks > 0 have nothing left to wait for.
    rank_zero = rank_zero_only.rank == 0
    if rank_zero:
        for plan in plans:
            write_arm_record(plan, study)
    if stage != "finetune":
        for plan in plans:
            if plan.pretrain is not None and _takes_part(plan.pretrain.trainer):
                ensure_pretrained(plan)
                _wait_for_rank_zero()
    study_dir = study.output_dir(Path(out), shrink)
    if stage == "pretrain":
        return study_dir
    for plan in plans:
        if not _takes_part(plan.finetune.trainer):
            continue
        if plan.pretrain_dir is not None and not (plan.pretrain_dir / "summary.json").is_file():
            raise StudyError(f"{study.path}: arm '{plan.name}' needs its pretraining ({plan.pretrain_dir}); run --stage pretrain (or all) first, with the same --pretrain overrides")
        ensure_finetuned(plan, study)
        if study.config.marker_eval is not None and rank_zero:
            evaluate_markers(plan.finetune_dir, study.config.marker_eval, plan.markers_dir)
    if rank_zero:
        write_table(study, study_dir)
    return study_dir


def _takes_part(trainer) -> bool:
    """Whether this process runs a stage: every rank a multi-device one, rank 0 alone the rest.

    Before a single-device stage rank 0 leaves the process group a finished DDP stage left
    behind (it outlives its trainer): code asking ``torch.distributed.is_initialized()``
    would otherwise wait for ranks that have moved on or exited.
    """
    if not _single_device(trainer):
        return True
    if rank_zero_only.rank != 0:
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return True


def _wait_for_rank_zero() -> None:
    """After a multi-device stage, every rank waits until rank 0 has written its outputs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _single_device(trainer) -> bool:
    """True when the trainer runs one process ("auto" and -1 may mean several: False)."""
    devices = trainer.devices
    if isinstance(devices, str):
        ids = [d for d in devices.split(",") if d.strip()]
        devices = len(ids) if "," in devices else int(devices) if devices.strip().isdigit() else -1
    return devices == 1 and trainer.num_nodes == 1


def write_arm_record(plan: ArmPlan, study: Study) -> None:
    plan.dir.mkdir(parents=True, exist_ok=True)
    record = {
        "study": study.name,
        "study_file": str(study.path.resolve()),
        "arm": plan.name,
        "pretrain_run": str(plan.pretrain_dir.resolve()) if plan.pretrain_dir else None,
        "finetune_run": str(plan.finetune_dir.resolve()),
        "overrides": plan.overrides,
    }
    _write_json_atomic(plan.dir / "arm.json", record)


def ensure_pretrained(plan: ArmPlan) -> None:
    """Pretrain unless ``summary.json`` (written last) says this config already was."""
    if (plan.pretrain_dir / "summary.json").is_file():
        return
    plan.pretrain_dir.mkdir(parents=True, exist_ok=True)
    run_pretraining(plan.pretrain, plan.pretrain_dir)


def ensure_finetuned(plan: ArmPlan, study: Study) -> None:
    """Run (or resume) the arm's CV unless its summary shows every fold x seed finished."""
    summary = _read_json(plan.finetune_dir / "summary.json")
    if summary is not None and summary.get("runs") == summary.get("expected_runs"):
        changed = _changed_keys(yaml.safe_load((plan.finetune_dir / "config.yaml").read_text()), to_dict(plan.finetune))
        if changed:
            raise StudyError(f"{study.path}: arm '{plan.name}' finished with a different config ({', '.join(changed[:5])}); use another --out or remove {plan.dir}")
        return
    try:
        run_cv(plan.finetune, plan.finetune_dir, callback_factory=finetune_callbacks)
    except ResumeMismatchError as error:
        raise StudyError(f"{study.path}: arm '{plan.name}': {error}; use another --out or remove {plan.dir}") from error


def _changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring where the trainer ran (LAUNCH_OPTIONS)."""
    changed = []
    for key in sorted(set(before) | set(after)):
        dotted = f"{prefix}{key}"
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{dotted}.")
        elif a != b and not (prefix == "trainer." and key in LAUNCH_OPTIONS):
            changed.append(dotted)
    return changed


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
    frame = load_manifest(cv_config.data.manifest, require_labels=True, decode_images=False).set_index("sample_id")
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
                save_overlay_grid(result.rows(shown), list(rows.index)[shown], out_dir / f"{run.name}-overlays.png")
            _write_json_atomic(record_path, record)
        records.append(json.loads(record_path.read_text()))
    runs = pd.DataFrame(records)
    summary = {"runs": len(records), "seed": config.seed, "max_images": config.max_images, "metrics": aggregate(runs, list(MARKER_METRICS))}
    _write_json_atomic(summary_path, summary)
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


# ---------------------------------------------------------------------------------- tables


@dataclass
class ArmResult:
    name: str
    cells: list[str]
    metrics: dict[str, dict]  # name -> {mean, std, n}
    runs: int
    expected_runs: int


def collect_results(study: Study, study_dir: Path) -> list[ArmResult]:
    """Each arm's row cells and metrics from its run dirs (arms not run yet have no metrics)."""
    results = []
    for name, arm in study.config.arms.items():
        arm_dir = study_dir / name
        metrics: dict[str, dict] = {}
        runs = expected = 0
        finetune = _read_json(arm_dir / "finetune" / "summary.json")
        if finetune is not None:
            metrics.update(finetune["metrics"])
            runs, expected = finetune["runs"], finetune["expected_runs"]
        markers = _read_json(arm_dir / "markers" / "summary.json")
        if markers is not None:
            metrics.update(markers["metrics"])
        fields = {"pretrain_images": _pretrain_images(arm_dir)}
        cells = [str(arm.row[column]).format_map(fields) for column in study.config.table.columns]
        results.append(ArmResult(name, cells, metrics, runs, expected))
    return results


def _pretrain_images(arm_dir: Path) -> str:
    record = _read_json(arm_dir / "arm.json")
    # Found beside the study dir (<out>/_pretrain/<key>), so a moved --out still renders.
    run = arm_dir.parent.parent / PRETRAIN_ROOT / Path(record["pretrain_run"]).name if record and record["pretrain_run"] else None
    pool = _read_json(run / "pool.json") if run else None
    return format_count(sum(pool["images_per_organ"].values())) if pool else "—"


def format_count(count: int) -> str:
    """1664 -> 1.66K, 1281167 -> 1.28M (the paper's '# Samples' style)."""
    if count >= 1_000_000:
        return f"{count / 1e6:.2f}M"
    if count >= 1_000:
        return f"{count / 1e3:.2f}K"
    return str(count)


def table_frame(study: Study, results: list[ArmResult]) -> pd.DataFrame:
    """One row per arm: its cells, then mean and std (in %) of each metric, and run counts."""
    rows = []
    for result in results:
        row = {"arm": result.name, **dict(zip(study.config.table.columns, result.cells))}
        for metric in study.config.table.metrics:
            stats = result.metrics.get(metric)
            row[f"{metric}_mean"] = 100 * stats["mean"] if stats else np.nan
            row[f"{metric}_std"] = 100 * stats["std"] if stats else np.nan
        rows.append({**row, "runs": result.runs, "expected_runs": result.expected_runs})
    return pd.DataFrame(rows)


def render_markdown(study: Study, results: list[ArmResult]) -> str:
    """The table as in the paper: mean ± std in %, the best mean of each column in bold."""
    table = study.config.table
    metrics = {**CV_METRICS, **MARKER_METRICS}
    digits = table.digits
    header = [*table.columns, *(metrics[m].header for m in table.metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + ":--|" * len(table.columns) + "--:|" * len(table.metrics)]
    best = {m: _best(results, m, metrics[m].better, digits) for m in table.metrics}
    for result in results:
        cells = [c.replace("|", "\\|") for c in result.cells]
        for metric in table.metrics:
            stats = result.metrics.get(metric)
            if stats is None or np.isnan(stats["mean"]):
                cells.append("—")
                continue
            text = f"{100 * stats['mean']:.{digits}f} ± {100 * stats['std']:.{digits}f}"
            cells.append(f"**{text}**" if round(100 * stats["mean"], digits) == best[metric] else text)
        lines.append("| " + " | ".join(cells) + " |")
    title = f"**{study.config.title}**" if study.config.title else f"**{study.name}**"
    return "\n".join([title, "", *lines, "", _footnote(results), ""])


def _best(results: list[ArmResult], metric: str, better: str | None, digits: int) -> float | None:
    means = [round(100 * r.metrics[metric]["mean"], digits) for r in results if metric in r.metrics and not np.isnan(r.metrics[metric]["mean"])]
    if better is None or len(means) < 2:
        return None
    return max(means) if better == "higher" else min(means)


def _footnote(results: list[ArmResult]) -> str:
    runs = sorted({r.expected_runs for r in results if r.runs})
    notes = [f"Mean ± sample std (%) over the folds x seeds of each arm ({'/'.join(map(str, runs)) or 'no'} runs); best mean per column in bold."]
    unfinished = [f"{r.name} ({f'{r.runs}/{r.expected_runs} runs' if r.runs else 'not run'})" for r in results if not r.runs or r.runs != r.expected_runs]
    if unfinished:
        notes.append("Not finished: " + ", ".join(unfinished) + ".")
    return " ".join(notes)


def write_table(study: Study, study_dir: Path) -> str:
    results = collect_results(study, study_dir)
    markdown = render_markdown(study, results)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "table.md").write_text(markdown)
    table_frame(study, results).to_csv(study_dir / "table.csv", index=False)
    return markdown


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# ------------------------------------------------------------------------------------- CLI


def parse_assignments(items: list[str]) -> dict[str, str]:
    variables = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise StudyError(f"--set {item!r}: expected NAME=VALUE")
        variables[name] = value
    return variables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tus experiment", description="Run a study's arms (pretraining where needed, then K-fold CV) and render its table.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run every arm not finished yet, then write the table")
    table = commands.add_parser("table", help="render the study's table from its run dirs (Markdown + CSV)")
    for command in (run, table):
        command.add_argument("study", help="a study file, e.g. experiments/studies/tab2.yaml")
        command.add_argument("--out", default="runs", help="runs root; arms go to OUT/<study>/<arm>/ (default: runs)")
        command.add_argument("--shrink", action="store_true", help="tiny CPU sizes from the study's shrink block; writes OUT/<study>-shrink/")
    run.add_argument("--arms", nargs="+", metavar="ARM", help="run only these arms (default: all)")
    run.add_argument("--set", dest="variables", action="append", default=[], metavar="NAME=VALUE", help="a ${NAME} used in the study (else taken from the environment)")
    run.add_argument("--pretrain", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="overrides for every arm's pretraining, e.g. trainer.devices=2 trainer.strategy=ddp")
    run.add_argument("--finetune", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="overrides for every arm's fine-tuning")
    run.add_argument("--stage", choices=STAGES, default="all", help="pretrain: only the arms' pretraining; finetune: only fine-tuning (pretraining must exist)")
    run.add_argument("--dry-run", action="store_true", help="resolve every arm and print what would run")
    args = parser.parse_args(argv)

    try:
        study = load_study(args.study)
        if args.command == "table":
            study_dir = study.output_dir(Path(args.out), args.shrink)
            if not study_dir.is_dir():
                raise StudyError(f"{study_dir}: no runs of study '{study.name}' here (wrong --out{'' if args.shrink else ' or --shrink'}?)")
            print(write_table(study, study_dir))
            print(f"written: {study_dir / 'table.md'}, {study_dir / 'table.csv'}")
            return 0
        variables = {**os.environ, **parse_assignments(args.variables)}
        extra = StageOverrides(pretrain=args.pretrain, finetune=args.finetune)
        if args.dry_run:
            for plan in plan_study(study, args.out, arms=args.arms, variables=variables, shrink=args.shrink, extra=extra):
                print(describe(plan))
            return 0
        study_dir = run_study(study, args.out, arms=args.arms, variables=variables, shrink=args.shrink, extra=extra, stage=args.stage)
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if rank_zero_only.rank == 0 and args.stage != "pretrain":
        print((study_dir / "table.md").read_text())
        print(f"study dir: {study_dir}")
    return 0


def describe(plan: ArmPlan) -> str:
    done = (plan.finetune_dir / "summary.json").is_file()
    lines = [f"{plan.name}: {plan.dir} ({'finished' if done else 'to run'})"]
    if plan.pretrain_dir is not None:
        pretrained = (plan.pretrain_dir / "summary.json").is_file()
        lines.append(f"  pretrain -> {plan.pretrain_dir} ({'finished' if pretrained else 'to run'}): {' '.join(plan.overrides['pretrain'])}")
    lines.append(f"  finetune: {' '.join(plan.overrides['finetune'])}")
    return "\n".join(lines)
