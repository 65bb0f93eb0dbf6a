"""The ``tus`` command: one entry point, one subcommand per stage.

Stage subcommands live next to their code and are imported only when called, so
``tus data check`` starts fast and a broken optional stage cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# subcommand -> "module:function" taking argv and returning an exit code
STAGES = {
    "data": ("tus.cli_data:main", "check, crop or generate (phantom) datasets"),
    "finetune-cv": ("tus.cli:finetune_cv_main", "patient-grouped K-fold x seeds fine-tuning"),
    "pretrain": ("tus.pretraining:main", "organ-supervised contrastive pretraining"),
    "diffusion": ("tus.diffusion:main", "train the improved-DDPM generator"),
    "sample": ("tus.synthetic.sampling:main", "sample images from a trained diffusion model"),
    "metrics": ("tus.synthetic.cli:metrics_main", "FID, IS, precision/recall of generated images"),
    "filter": ("tus.synthetic.cli:filter_main", "k-NN manifold filter of generated images"),
    "noisy-labels": ("tus.noisy_labels:main", "flag noisy labels from per-sample loss trajectories"),
    "explain": ("tus.explain:main", "Grad-CAM++ overlays and marker sensitivity"),
    "experiment": ("tus.experiments:main", "run a study's arms and render its table"),
    "demo": ("tus.demo:main", "the whole pipeline on the generated phantom dataset"),
}


def main(argv: list[str] | None = None) -> int:
    # Library deprecation chatter (Lightning's pytree use) says nothing to a tus user.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        usage = "\n".join(f"  {name:<13} {help_text}" for name, (_, help_text) in STAGES.items())
        print(f"usage: tus <command> [options]\n\ncommands:\n{usage}\n\n'tus <command> --help' for a command's options.")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    target, _ = STAGES[argv[0]]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(argv[1:]) or 0)


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
    from tus.cv import FineTuneCVConfig, run_cv
    from tus.stage_callbacks import finetune_callbacks

    config = load_config(FineTuneCVConfig, args.config, args.overrides)
    run_dir = run_cv(config, args.run_dir, callback_factory=finetune_callbacks)
    print((run_dir / "summary.md").read_text())
    print(f"run dir: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
