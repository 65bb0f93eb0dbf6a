"""``tus finetune-cv``: argv -> FineTuneCVConfig -> :func:`tus.stages.finetune_cv.run_cv`."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """The config options every training stage shares: a YAML file plus key=value overrides."""
    parser.add_argument("--config", default=default_config, help="YAML config (its 'base:' files are merged first)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.batch_size=32")


def finetune_cv_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tus finetune-cv", description="Patient-grouped K-fold x seeds fine-tuning; writes a new run dir with runs.csv and summary.md.")
    add_config_arguments(parser, "experiments/finetune/paper.yaml")
    parser.add_argument("--run-dir", help="resume this run dir (finished fold x seed runs are skipped)")
    args = parser.parse_args(argv)

    from tus.config import load_config
    from tus.stages.finetune_cv import FineTuneCVConfig, finetune_callbacks, run_cv

    config = load_config(FineTuneCVConfig, args.config, args.overrides)
    run_dir = run_cv(config, args.run_dir, callback_factory=finetune_callbacks)
    print((run_dir / "summary.md").read_text())
    print(f"run dir: {run_dir}")
    return 0
