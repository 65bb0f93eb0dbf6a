"""``tus finetune-cv``: argv -> FineTuneCVConfig -> :func:`tus.stages.finetune_cv.run_cv`.

A CV split over processes (a SLURM job array, docker/slurm_finetune_cv.sbatch):
``--prepare`` makes the run dir, ``--run-dir RUN --only fold=F,seed=S`` (or ``--task-index I``)
trains one fold x seed run into it, ``--join RUN`` writes the summary a local run writes.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from tus.cli.common import parse_stage_args
from tus.config import ConfigError

SPLIT_HELP = (
    " On a cluster: --prepare makes the run dir and prints the number of tasks; --run-dir RUN --only fold=F,seed=S "
    "(or --task-index I, e.g. $SLURM_ARRAY_TASK_ID) trains one fold x seed run into it; --join RUN writes runs.csv and the summary "
    "(refused while a run is missing)."
)


def _split_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--prepare", action="store_true")
    parser.add_argument("--only")
    parser.add_argument("--task-index", type=int)
    parser.add_argument("--join")
    return parser.parse_known_args(argv)


def _only(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*fold\s*=\s*(\d+)\s*,\s*seed\s*=\s*(-?\d+)\s*", text)
    if not match:
        raise ConfigError(f"--only {text!r}: give fold=F,seed=S (e.g. --only fold=0,seed=1)")
    return int(match.group(1)), int(match.group(2))


def finetune_cv_main(argv: list[str]) -> int:
    from tus.stages.configs import FineTuneCVConfig  # torch-free: --help and --print_config stay instant

    split, argv = _split_flags(argv)
    if split.join:
        if argv:
            raise ConfigError(f"tus finetune-cv --join uses RUN_DIR/config.yaml; nothing else is given with it (got {' '.join(argv)})")
        from tus.config import load_config
        from tus.stages.finetune_cv import join_cv

        run_dir = Path(split.join)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir}: not a CV run dir to join (no config.yaml)")
        join_cv(load_config(FineTuneCVConfig, run_dir / "config.yaml"), run_dir)
        print((run_dir / "summary.md").read_text())
        print(f"run dir: {run_dir}")
        return 0
    args = parse_stage_args(
        FineTuneCVConfig,
        argv,
        prog="tus finetune-cv",
        description="Patient-grouped K-fold x seeds fine-tuning; writes a new run dir with runs.csv and summary.md." + SPLIT_HELP,
        default_config="finetune/paper",
        resume_flags=("--resume", "--run-dir"),
    )
    if args is None:
        return 0
    from tus.stages.finetune_cv import cv_jobs, prepare_cv, run_cv, run_cv_task

    if split.prepare:
        if args.resume:
            raise ConfigError("tus finetune-cv --prepare makes a new run dir; it takes no --run-dir")
        run_dir = prepare_cv(args.config)
        tasks = len(cv_jobs(args.config))
        print(f"run dir: {run_dir}")
        print(f"tasks: {tasks} (--task-index 0..{tasks - 1}, e.g. sbatch --array=0-{tasks - 1}); then tus finetune-cv --join {run_dir}")
        return 0
    if split.only is not None or split.task_index is not None:
        if args.resume is None:
            raise ConfigError("tus finetune-cv --only/--task-index trains one run of an existing CV run dir: give --run-dir RUN (made by --prepare)")
        if split.only is not None and split.task_index is not None:
            raise ConfigError("tus finetune-cv: give --only or --task-index, not both")
        jobs = cv_jobs(args.config)
        if split.task_index is not None:
            if not 0 <= split.task_index < len(jobs):
                raise ConfigError(f"--task-index {split.task_index}: this CV has {len(jobs)} fold x seed runs (0..{len(jobs) - 1})")
            fold, seed = jobs[split.task_index]
        else:
            fold, seed = _only(split.only)
        target = run_cv_task(args.config, args.resume, fold, seed)
        print(f"fold {fold} seed {seed}: {target}")
        print(f"when every run has finished: tus finetune-cv --join {args.resume}")
        return 0
    run_dir = run_cv(args.config, args.resume, allow_config_change=args.allow_config_change)
    print((run_dir / "summary.md").read_text())
    print(f"run dir: {run_dir}")
    return 0
