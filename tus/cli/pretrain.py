"""``tus pretrain``: argv -> PretrainConfig -> :func:`tus.stages.pretrain.run_pretraining`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from tus.config import load_config
from tus.stages.pretrain import PretrainConfig, run_pretraining


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tus pretrain",
        description="Organ-supervised contrastive pretraining (SimCLR + organ CE, LARS); writes a new run dir with encoder.safetensors.",
    )
    parser.add_argument("--config", help="YAML config, e.g. experiments/pretrain/cpu.yaml (not needed with --resume)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint, with its config.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.max_steps=200")
    args = parser.parse_args(argv)
    if args.resume:
        if args.config:
            parser.error("--resume uses RUN_DIR/config.yaml; give overrides instead of --config")
        config = load_config(PretrainConfig, Path(args.resume) / "config.yaml", args.overrides)
    elif args.config:
        config = load_config(PretrainConfig, args.config, args.overrides)
    else:
        parser.error("give --config CONFIG.yaml, or --resume RUN_DIR")
    run_dir = run_pretraining(config, args.resume)
    if rank_zero_only.rank == 0:
        print(f"encoder: {run_dir / 'encoder.safetensors'}")
        print(f"run dir: {run_dir}")
    return 0
