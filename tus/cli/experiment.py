"""``tus experiment run|plan|table``: run a study's arms and render its table."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tus.studies.schema import STAGES, StageOverrides, StudyError, load_study

if TYPE_CHECKING:
    from tus.studies.runner import ArmPlan


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
    run.add_argument("--diffusion", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="overrides for the per-fold generators of a synthetic: study")
    run.add_argument("--synthetic", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="overrides of a study's synthetic: block, e.g. per_class=200 filter_k=null")
    run.add_argument("--stage", choices=STAGES, default="all", help="pretrain: only the arms' pretraining; finetune: only fine-tuning (pretraining must exist)")
    run.add_argument("--dry-run", action="store_true", help="resolve every arm and print what would run")
    args = parser.parse_args(argv)
    # The runner imports every stage (torch, Lightning): not needed for --help.
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from tus.studies.runner import plan_study, run_study
    from tus.studies.tables import write_table

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
        extra = StageOverrides(pretrain=args.pretrain, finetune=args.finetune, diffusion=args.diffusion, synthetic=args.synthetic)
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
    for run in plan.pretrains:
        pretrained = (run.dir / "summary.json").is_file()
        lines.append(
            f"  pretrain ({'pool as given' if run.excludes == 'none' else f'pool without {run.excludes} labelled patients'}) -> {run.dir} ({'finished' if pretrained else 'to run'}): {' '.join(plan.overrides['pretrain'])}"
        )
    lines.append(f"  finetune: {' '.join(plan.overrides['finetune'])}")
    synthetic = plan.finetune.data.synthetic
    if synthetic.source:
        what = "synthetic images only" if synthetic.only else "real + synthetic images"
        lines.append(f"  trains on {what} from {synthetic.source} (one generator per test fold, without its patients)")
    return "\n".join(lines)
