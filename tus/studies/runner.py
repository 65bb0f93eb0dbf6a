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
    <out>/<study>/folds/*.csv            the labelled manifest's folds (the complete one in a noisy-
                                         label study), which every CV of the study reads
                                         (``data.folds_from``): the arms are paired by construction
    <out>/_pretrain/<key>/               pretraining runs keyed by a hash of their config: arms of
                                         any study asking for the same pretraining share one run
    <out>/_pretrain/<key>-fold<k>/       with ``exclude_labeled: per_fold`` (the default), one run per
                                         test fold (``-seed<s>-fold<k>`` with folds drawn per seed),
                                         its pool without that fold's test patients
    <out>/_pretrain/folds/<hash>.csv     the fold tables those pools leave out (as ``run_cv`` draws them)

``--shrink`` appends the study's ``shrink`` overrides (tiny CPU sizes) and writes to
``<out>/<study>-shrink/`` instead, so a smoke run never mixes with real results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only

from tus.config import ConfigError, changed_keys, load_config, to_dict, write_text_atomic
from tus.data.folds import fold_table
from tus.data.images import content_hash, list_images
from tus.data.manifest import load_manifest
from tus.data.near_duplicates import MAX_DISTANCE, NearDuplicateConfig
from tus.data.overlap import find_overlap
from tus.eval.noisy_labels import FlaggingRule
from tus.runs import read_json, write_json_atomic
from tus.stages.finetune_cv import FineTuneCVConfig, ResumeMismatchError, cv_folds, run_cv
from tus.stages.pretrain import PretrainConfig, run_pretraining
from tus.studies.markers import evaluate_markers
from tus.studies.noisy_labels import FLAGGING_DIR, FLAGS_DIR, flag_labels, read_fold_safe_flags, run_fold_safe_cv
from tus.studies.schema import PRETRAIN_ROOT, StageOverrides, Study, StudyError, substitute
from tus.studies.schema import STAGES as STAGES
from tus.studies.synthetic import ensure_synthetic, synthetic_template
from tus.studies.tables import write_table
from tus.tracking import track_study

# Trainer options that say where a run executes, not what it computes: a finished run is
# found again whatever they are now (a pretraining done as a 2-GPU job is reused by a later
# single-GPU invocation, e.g. `--stage finetune`).
LAUNCH_OPTIONS = ("accelerator", "devices", "num_nodes", "strategy", "enable_progress_bar")


@dataclass
class PretrainRun:
    """One pretraining of an arm: its config, its run dir, and what its pool leaves out
    (``none``, ``all``, ``fold<k>`` or ``seed<s>-fold<k>``)."""

    config: PretrainConfig
    dir: Path
    excludes: str
    # Per-fold pools: the fold table to write (before pretraining) for ``config.data.labeled_manifest``.
    fold_table: tuple[FineTuneCVConfig, int | None] | None = None


@dataclass
class ArmPlan:
    """Everything one arm runs, fully resolved."""

    name: str
    dir: Path
    finetune: FineTuneCVConfig
    pretrains: list[PretrainRun]
    overrides: dict[str, list[str]]
    labels: str = "complete"
    label_protocol: str = "reference"
    # The labelled manifest before any flagging (fold-safe arms and the flags start from it).
    complete_manifest: str = ""
    exclude_labeled: str = "none"

    @property
    def pretrain(self) -> PretrainConfig | None:
        """The (first) pretraining's config; None for an arm that only fine-tunes."""
        return self.pretrains[0].config if self.pretrains else None

    @property
    def pretrain_dir(self) -> Path | None:
        return self.pretrains[0].dir if self.pretrains else None

    @property
    def finetune_dir(self) -> Path:
        return self.dir / "finetune"

    @property
    def markers_dir(self) -> Path:
        return self.dir / "markers"


def pretrain_key(config: PretrainConfig) -> str:
    """A hash of what a pretraining computes (not its name, logging or where it runs); a pool that
    leaves labelled images out is keyed by the labelled manifest's content too, not only its path."""
    data = to_dict(config)
    for name in ("name", "output_root", "logging"):
        data.pop(name)
    for name in LAUNCH_OPTIONS:
        data["trainer"].pop(name)
    labeled = config.data.labeled_manifest
    if config.data.exclude_labeled != "none" and labeled and Path(labeled).is_file():
        data["data"]["labeled_manifest_hash"] = content_hash(labeled)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


POOL_FOLDS_DIR = "folds"


def pool_runs(base: PretrainConfig, mode: str, finetune: FineTuneCVConfig, root: Path) -> list[PretrainRun]:
    """The pretraining runs of an arm whose pools leave out its labelled images as ``mode`` says
    (:data:`tus.studies.schema.POOL_EXCLUSIONS`); ``root`` is ``<out>/_pretrain``.

    ``per_fold``: one run per test fold of the arm's CV (per fold and seed when its folds are
    drawn per seed), each pool without that fold's test patients; the fold tables are written
    under ``root/folds`` before pretraining (:func:`write_fold_tables`), keyed by the labelled
    manifest's content and the fold options.
    """
    manifest = finetune.data.manifest
    if mode == "none":
        return [PretrainRun(base, root / pretrain_key(base), "none")]
    if mode == "all":
        config = dataclasses.replace(base, data=dataclasses.replace(base.data, exclude_labeled="all", labeled_manifest=manifest, test_folds=None))
        return [PretrainRun(config, root / pretrain_key(config), "all")]
    data = finetune.data
    seeds: list[int | None] = list(finetune.seeds) if data.folds_per_seed else [None]
    source = content_hash(manifest) if Path(manifest).is_file() else manifest
    folds_key = hashlib.sha256(json.dumps([source, data.num_folds, data.fold_seed, data.folds_per_seed, seeds]).encode()).hexdigest()[:12]
    shared = dataclasses.replace(base, data=dataclasses.replace(base.data, exclude_labeled="test_folds", labeled_manifest=None, test_folds=None))
    key = f"{pretrain_key(shared)}-{folds_key}"
    runs = []
    for seed in seeds:
        table = root / POOL_FOLDS_DIR / (f"{folds_key}.csv" if seed is None else f"{folds_key}-seed{seed}.csv")
        for fold in range(data.num_folds):
            excludes = f"fold{fold}" if seed is None else f"seed{seed}-fold{fold}"
            config = dataclasses.replace(base, data=dataclasses.replace(base.data, exclude_labeled="test_folds", labeled_manifest=str(table), test_folds=[fold]))
            runs.append(PretrainRun(config, root / f"{key}-{excludes}", excludes, (finetune, seed)))
    return runs


def encoder_template(runs: list[PretrainRun]) -> str:
    """``model.weights`` for the fine-tuning: the encoder, or with per-fold pools each run's
    (``{fold}``/``{seed}`` filled in by :func:`tus.stages.finetune_cv.weights_for_run`)."""
    first = runs[0]
    if first.fold_table is None:
        return str(first.dir / "encoder")
    name = first.dir.name.removesuffix(first.excludes) + ("fold{fold}" if first.fold_table[1] is None else "seed{seed}-fold{fold}")
    return str(first.dir.parent / name / "encoder")


def write_fold_tables(run: PretrainRun) -> None:
    """Write the fold table a per-fold pool leaves out (the folds ``run_cv`` will test on), unless there."""
    if run.fold_table is None:
        return
    table = Path(run.config.data.labeled_manifest or "")
    if table.is_file():
        return
    finetune, seed = run.fold_table
    frame = load_manifest(finetune.data.manifest, require_labels=True, num_folds=finetune.data.num_folds, dicom_frames=finetune.data.dicom_frames, label_names=finetune.data.label_names)
    folds = cv_folds(finetune, frame)
    rows = fold_table(frame, folds[seed] if isinstance(folds, dict) else folds).assign(path=frame["abs_path"].to_numpy())
    table.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(table, rows.to_csv(index=False))


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
        arm_shrunk = arm.shrink if shrink and arm.shrink is not None else StageOverrides()
        finetune = [substitute(o, variables, names) for o in [*study_defaults(config), *config.finetune, *arm.finetune, *shrunk.finetune, *arm_shrunk.finetune, *extra.finetune]]
        pretrain = None
        if arm.pretrain is not None:
            pretrain = [substitute(o, variables, names) for o in [*config.pretrain, *arm.pretrain, *shrunk.pretrain, *arm_shrunk.pretrain, *extra.pretrain]]
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
        arm = config.arms[name]
        finetune_config = _load_stage(FineTuneCVConfig, study, name, "finetune", arm.finetune_config or config.finetune_config, resolved[name]["finetune"])
        complete = finetune_config.data.manifest
        exclude = arm.exclude_labeled or config.exclude_labeled
        runs: list[PretrainRun] = []
        if resolved[name]["pretrain"] is not None:
            base = _load_stage(PretrainConfig, study, name, "pretrain", arm.pretrain_config or config.pretrain_config, resolved[name]["pretrain"])
            if base.data.exclude_labeled != "none" and exclude != "none":
                raise StudyError(
                    f"{study.path}: arm '{name}': its pretraining sets data.exclude_labeled={base.data.exclude_labeled}; the study leaves labelled images out itself (exclude_labeled: {exclude}); "
                    "drop the override or set the arm's exclude_labeled: none"
                )
            runs = [
                dataclasses.replace(
                    run,
                    config=dataclasses.replace(
                        run.config,
                        name=f"{study_dir.name}-{name}-pretrain" + ("" if run.excludes in ("none", "all") else f"-{run.excludes}"),
                        output_root=str(out / PRETRAIN_ROOT),
                        logging=_tagged(run.config.logging, group, "pretrain", tags),
                    ),
                )
                for run in pool_runs(base, exclude, finetune_config, out / PRETRAIN_ROOT)
            ]
        model = finetune_config.model
        if runs:
            model = dataclasses.replace(model, init="tus", weights=encoder_template(runs))
        data = finetune_config.data
        # Every CV of the study reads its labelled manifest's folds from one table: arms are paired
        # by construction, also those that drop or relabel rows (noisy-label arms).
        data = dataclasses.replace(data, folds_from=str(shared_fold_table(study_dir, complete, finetune_config)))
        if arm.labels != "complete" and arm.label_protocol == "reference":
            data = dataclasses.replace(data, manifest=str(study_dir / FLAGS_DIR / f"manifest_{arm.labels}.csv"))
        if arm.synthetic != "none":
            # Each fold trains on the samples of its own generator (tus.studies.synthetic), which never saw its test patients.
            source = synthetic_template(study_dir, data.folds_per_seed)
            data = dataclasses.replace(data, synthetic=dataclasses.replace(data.synthetic, source=source, only=arm.synthetic == "only"))
        finetune_config = dataclasses.replace(
            finetune_config,
            name=f"{study_dir.name}-{name}",
            output_root=str(study_dir),
            model=model,
            data=data,
            logging=_tagged(finetune_config.logging, group, "finetune", tags),
        )
        plans.append(ArmPlan(name, study_dir / name, finetune_config, runs, resolved[name], arm.labels, arm.label_protocol, complete, exclude if runs else "none"))
    return plans


def plan_flagging(study: Study, out: str | Path, *, variables: Mapping[str, str] | None = None, shrink: bool = False, extra: StageOverrides | None = None) -> dict[str, FineTuneCVConfig]:
    """The flagging CVs of the study's ``noisy_labels:`` block, one per initialisation, each
    recording per-sample losses; resolved like arms (study <- init <- shrink <- extra)."""
    config = study.config
    assert config.noisy_labels is not None
    variables = dict(os.environ) if variables is None else variables
    extra = extra or StageOverrides()
    shrunk = config.shrink if shrink else StageOverrides()
    study_dir = study.output_dir(Path(out), shrink)
    configs = {}
    for name, overrides in config.noisy_labels.inits.items():
        missing: set[str] = set()
        resolved = [substitute(o, variables, missing) for o in [*study_defaults(config), *config.finetune, *overrides, *shrunk.finetune, *extra.finetune]]
        if missing:
            raise StudyError(f"{study.path}: noisy_labels.inits.{name}: variable(s) not set: {', '.join(sorted(missing))}")
        finetune = _load_stage(FineTuneCVConfig, study, f"noisy_labels.inits.{name}", "finetune", config.finetune_config, resolved)
        tags = [study.name, f"flag-{name}", *(["shrink"] if shrink else [])]
        configs[name] = dataclasses.replace(
            finetune,
            data=dataclasses.replace(finetune.data, folds_from=str(shared_fold_table(study_dir, finetune.data.manifest, finetune))),
            name=f"{study_dir.name}-flag-{name}",
            output_root=str(study_dir),
            init_label=name,
            record_losses=True,
            logging=_tagged(finetune.logging, f"{study_dir.name}/flagging", "flagging", tags),
        )
    manifests = {c.data.manifest for c in configs.values()}
    if len(manifests) > 1:
        raise StudyError(f"{study.path}: noisy_labels.inits fine-tune on different manifests {sorted(manifests)}")
    return configs


def config_arm(study: Study, plan: ArmPlan):
    """The study file's arm of a plan."""
    return study.config.arms[plan.name]


def synthetic_overrides(study: Study, variables: Mapping[str, str] | None, shrink: bool, extra: StageOverrides | None) -> list[str]:
    """Overrides of the per-fold generators' diffusion config after the ``synthetic:`` block's: the study's
    shrink (with ``--shrink``) and the command line's, variables substituted."""
    variables = dict(os.environ) if variables is None else variables
    missing: set[str] = set()
    assert study.config.synthetic is not None
    overrides = [*study.config.synthetic.diffusion, *(study.config.shrink.diffusion if shrink else []), *(extra.diffusion if extra else [])]
    resolved = [substitute(o, variables, missing) for o in overrides]
    if missing:
        raise StudyError(f"{study.path}: synthetic.diffusion: variable(s) not set: {', '.join(sorted(missing))}")
    return resolved


def study_defaults(config) -> list[str]:
    """Fine-tuning overrides a study puts before its own: the folds are re-drawn per seed
    (``folds_per_seed``, the reference code's protocol and what the corrected resampled t-test
    of the study's comparisons assumes); a study or arm may still override it."""
    return [f"data.folds_per_seed={str(config.folds_per_seed).lower()}"]


FOLDS_DIR = "folds"


def shared_fold_table(study_dir: Path, manifest: str, config: FineTuneCVConfig) -> Path:
    """Where the study keeps the folds of the labelled ``manifest`` under ``config``'s fold
    settings: one table per (manifest, K, fold seed or per-seed seeds), which every CV of the
    study with those settings reads (``data.folds_from``), so arms that drop or relabel rows of
    the manifest keep each row's fold (written by :func:`write_shared_fold_table`)."""
    data = config.data
    tag = hashlib.sha256(str(Path(manifest).resolve()).encode()).hexdigest()[:8]
    drawn = f"seeds{'_'.join(map(str, config.seeds))}" if data.folds_per_seed else f"fold_seed{data.fold_seed}"
    return study_dir / FOLDS_DIR / f"{Path(manifest).stem}-{tag}-k{data.num_folds}-{drawn}.csv"


def write_shared_fold_table(config: FineTuneCVConfig, manifest: str, study: Study) -> None:
    """Draw the folds of the complete ``manifest`` into ``config.data.folds_from`` (or check
    that an existing table still holds them: the manifest must not change under a study)."""
    from tus.data.folds import fold_table
    from tus.stages.finetune_cv import cv_folds

    path = Path(config.data.folds_from)
    frame = load_manifest(manifest, require_labels=True, num_folds=config.data.num_folds, dicom_frames=config.data.dicom_frames, label_names=config.data.label_names)
    folds = cv_folds(dataclasses.replace(config, data=dataclasses.replace(config.data, folds_from=None)), frame)
    table = pd.concat([fold_table(frame, f).assign(seed=seed) for seed, f in folds.items()]) if isinstance(folds, dict) else fold_table(frame, folds)
    text = table.to_csv(index=False)
    if path.is_file():
        if path.read_text() != text:
            raise StudyError(f"{study.path}: {path} no longer matches {manifest} (the labelled manifest changed under this study); use another --out or remove {path.parent.parent}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


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
    synthetic_arms = [plan for plan in plans if config_arm(study, plan).synthetic != "none"]
    block = None
    if synthetic_arms:  # the synthetic: block with its overrides, checked before anything runs
        assert study.config.synthetic is not None
        try:
            block = study.config.synthetic.with_overrides([*(study.config.shrink.synthetic if shrink else []), *(extra.synthetic if extra else [])])
        except ConfigError as error:
            raise StudyError(f"{study.path}: {error}") from error
    # Under DDP every rank runs this function (Lightning relaunches the command for ranks > 0;
    # torchrun and srun start every rank). All pretraining comes first, so once the
    # multi-device stages are over, ranks > 0 have nothing left to wait for.
    rank_zero = rank_zero_only.rank == 0
    if rank_zero:
        for plan in plans:
            write_arm_record(plan, study)
    if rank_zero and stage != "finetune":
        warn_pool_overlap(plans)
    if stage != "finetune":
        for plan in plans:
            for run in plan.pretrains:
                if _takes_part(run.config.trainer):
                    ensure_pretrained(run)
                    _wait_for_rank_zero()
    study_dir = study.output_dir(Path(out), shrink)
    if stage == "pretrain":
        return study_dir
    flags_dir = None
    if rank_zero:
        for plan in plans:
            write_shared_fold_table(plan.finetune, plan.complete_manifest, study)
    if study.config.noisy_labels is not None and any(plan.labels != "complete" for plan in plans):
        flagging = plan_flagging(study, out, variables=variables, shrink=shrink, extra=extra)
        if rank_zero:
            for config in flagging.values():
                write_shared_fold_table(config, config.data.manifest, study)
        block = study.config.noisy_labels
        rule = FlaggingRule(block.threshold, block.min_exceed, block.min_fraction, block.counting)
        flags_dir = flag_labels(flagging, study_dir / FLAGGING_DIR, study_dir / FLAGS_DIR, rule, block.histogram_min_exceed)
    if synthetic_arms and rank_zero:
        assert block is not None
        ensure_synthetic(study, block, synthetic_arms[0].finetune, study_dir, synthetic_overrides(study, variables, shrink, extra))
    for plan in plans:
        if not _takes_part(plan.finetune.trainer):
            continue
        unfinished = [run.dir for run in plan.pretrains if not (run.dir / "summary.json").is_file()]
        if unfinished:
            raise StudyError(
                f"{study.path}: arm '{plan.name}' needs its pretraining ({unfinished[0]}{f' and {len(unfinished) - 1} more' if len(unfinished) > 1 else ''}); "
                "run --stage pretrain (or all) first, with the same --pretrain overrides"
            )
        ensure_finetuned(plan, study, flags_dir)
        if study.config.marker_eval is not None and rank_zero:
            evaluate_markers(plan.finetune_dir, study.config.marker_eval, plan.markers_dir)
    if rank_zero:
        write_table(study, study_dir)
        if plans:
            track_study(study_dir, _tagged(plans[0].finetune.logging, study.name, "study-summary", []), name=study.name)
    return study_dir


def warn_pool_overlap(plans: list[ArmPlan]) -> None:
    """Warn when an arm pretrains on a pool holding labelled images it will be tested on.

    The reference's pools contain its labelled set, so test-fold images reach pretraining. Only arms
    with ``exclude_labeled: none`` are checked (the others' pools are cleaned when built), with
    :func:`tus.data.overlap.find_overlap`: identical files or pixels, near duplicates (re-encoded,
    resized, brightened, cropped, mirrored) and, where the pool has patient ids, labelled patients' images."""
    checked: dict[str, int] = {}
    for plan in plans:
        if plan.exclude_labeled != "none" or plan.pretrain is None or plan.pretrain.data.exclude_labeled != "none":
            continue
        key = pretrain_key(plan.pretrain)
        if key not in checked:
            labeled = load_manifest(plan.complete_manifest or plan.finetune.data.manifest, require_labels=False, decode_images=False, dicom_frames=plan.finetune.data.dicom_frames)
            shared = set()
            for index, source in enumerate(plan.pretrain.data.sources):
                pool = _source_frame(source)
                overlap = find_overlap(pool, labeled, [-1] * len(labeled), NearDuplicateConfig(MAX_DISTANCE))
                shared |= {(index, row) for row in overlap["pool_row"]}
            checked[key] = len(shared)
        if checked[key]:
            print(
                f"warning: arm '{plan.name}': {checked[key]} images of its pretraining pool are labelled images it is tested on, their near duplicates or their patients' images "
                f"(test-fold leakage, as in the reference); set the study's (or arm's) exclude_labeled: per_fold or all to leave them out",
                flush=True,
            )


def _source_frame(source) -> pd.DataFrame:
    if source.manifest:
        return load_manifest(source.manifest, require_labels=False, decode_images=False)
    paths = [str(p) for p in list_images(source.folder)]
    return pd.DataFrame({"abs_path": paths, "sample_id": paths, "patient_id": paths})


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
        # What the pools left out (per_fold | all | none) and every pretraining run (per fold: one each).
        "exclude_labeled": plan.exclude_labeled,
        "pretrain_runs": {run.excludes: str(run.dir.resolve()) for run in plan.pretrains},
        "finetune_run": str(plan.finetune_dir.resolve()),
        "overrides": plan.overrides,
    }
    write_json_atomic(plan.dir / "arm.json", record)


def ensure_pretrained(run: PretrainRun) -> None:
    """Pretrain unless ``summary.json`` (written last) says this config already was; a per-fold
    pool's fold table is written first."""
    if (run.dir / "summary.json").is_file():
        return
    write_fold_tables(run)
    run.dir.mkdir(parents=True, exist_ok=True)
    run_pretraining(run.config, run.dir, create=True)


def ensure_finetuned(plan: ArmPlan, study: Study, flags_dir: Path | None = None) -> None:
    """Run (or resume) the arm's CV unless its summary shows every fold x seed finished.

    A fold-safe arm trains run (k, seed) on the manifest whose training folds (not fold k)
    had the flagged samples removed or flipped (:func:`run_fold_safe_cv`)."""
    summary = read_json(plan.finetune_dir / "summary.json")
    if summary is not None and summary.get("runs") == summary.get("expected_runs"):
        changed = _changed_keys(yaml.safe_load((plan.finetune_dir / "config.yaml").read_text()), to_dict(plan.finetune))
        if changed:
            raise StudyError(f"{study.path}: arm '{plan.name}' finished with a different config ({', '.join(changed[:5])}); use another --out or remove {plan.dir}")
        return
    try:
        if plan.label_protocol == "fold_safe":
            assert flags_dir is not None
            config = dataclasses.replace(plan.finetune, data=dataclasses.replace(plan.finetune.data, manifest=plan.complete_manifest))
            run_fold_safe_cv(config, plan.complete_manifest, read_fold_safe_flags(flags_dir), plan.labels, plan.finetune_dir)
        else:
            run_cv(plan.finetune, plan.finetune_dir, create=True)
    except ResumeMismatchError as error:
        raise StudyError(f"{study.path}: arm '{plan.name}': {error}; use another --out or remove {plan.dir}") from error


def _changed_keys(before: dict, after: dict) -> list[str]:
    """Dotted keys whose values differ, ignoring where the trainer ran (LAUNCH_OPTIONS)."""
    return [key for key in changed_keys(before, after) if not (key.startswith("trainer.") and key.split(".", 1)[1] in LAUNCH_OPTIONS)]


# ---------------------------------------------------------------------------------- tables


# ------------------------------------------------------------------------------------- CLI
