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

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only

from tus.config import ConfigError, load_config, to_dict
from tus.runs import read_json, write_json_atomic
from tus.stages.finetune_cv import FineTuneCVConfig, ResumeMismatchError, finetune_callbacks, run_cv
from tus.stages.pretrain import PretrainConfig, run_pretraining
from tus.studies.markers import evaluate_markers
from tus.studies.schema import PRETRAIN_ROOT, StageOverrides, Study, StudyError, substitute
from tus.studies.tables import write_table

STAGES = ("all", "pretrain", "finetune")
# Trainer options that say where a run executes, not what it computes: a finished run is
# found again whatever they are now (a pretraining done as a 2-GPU job is reused by a later
# single-GPU invocation, e.g. `--stage finetune`).
LAUNCH_OPTIONS = ("accelerator", "devices", "num_nodes", "strategy", "enable_progress_bar")
























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
    write_json_atomic(plan.dir / "arm.json", record)


def ensure_pretrained(plan: ArmPlan) -> None:
    """Pretrain unless ``summary.json`` (written last) says this config already was."""
    if (plan.pretrain_dir / "summary.json").is_file():
        return
    plan.pretrain_dir.mkdir(parents=True, exist_ok=True)
    run_pretraining(plan.pretrain, plan.pretrain_dir)


def ensure_finetuned(plan: ArmPlan, study: Study) -> None:
    """Run (or resume) the arm's CV unless its summary shows every fold x seed finished."""
    summary = read_json(plan.finetune_dir / "summary.json")
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








# ---------------------------------------------------------------------------------- tables
























# ------------------------------------------------------------------------------------- CLI






