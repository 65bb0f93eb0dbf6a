"""``tus pretrain``: argv -> PretrainConfig -> :func:`tus.stages.pretrain.run_pretraining`."""

from __future__ import annotations

from lightning.fabric.utilities.rank_zero import rank_zero_only

from tus.cli.common import parse_stage_args


def main(argv: list[str] | None = None) -> int:
    from tus.stages.pretrain import PretrainConfig, run_pretraining

    args = parse_stage_args(
        PretrainConfig,
        list(argv or []),
        prog="tus pretrain",
        description="Self-supervised pretraining of an encoder by a registered method (simclr_organ, mae, ...); writes a new run dir with the encoder export.",
        default_config=None,
    )
    if args is None:
        return 0
    run_dir = run_pretraining(args.config, args.resume, allow_config_change=args.allow_config_change)
    if rank_zero_only.rank == 0:
        print(f"encoder: {run_dir / 'encoder'}")
        print(f"run dir: {run_dir}")
    return 0
