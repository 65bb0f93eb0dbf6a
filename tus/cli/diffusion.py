"""``tus diffusion``: argv -> DiffusionConfig -> :func:`tus.stages.diffusion.run_diffusion`."""

from __future__ import annotations

import argparse

from tus.config import load_config
from tus.stages.diffusion import DiffusionConfig, latest_run_config, run_diffusion


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tus diffusion", description="Train the improved DDPM (learned variance, hybrid loss).")
    parser.add_argument("--config", help="YAML config (e.g. experiments/diffusion/cpu.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from checkpoints/last.ckpt with the config it last ran with")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. trainer.max_steps=2000")
    args = parser.parse_args(argv)
    if args.resume and args.config:
        parser.error("--resume uses the run's own config; give overrides instead of --config")
    if args.resume:
        config = load_config(DiffusionConfig, latest_run_config(args.resume), args.overrides)
    else:
        config = load_config(DiffusionConfig, args.config, args.overrides)
    run_dir = run_diffusion(config, run_dir=args.resume)
    print(f"run directory: {run_dir}")
    return 0
