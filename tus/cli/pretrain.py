"""``tus pretrain``: argv -> PretrainConfig -> :func:`tus.stages.pretrain.run_pretraining`."""

from __future__ import annotations

from tus.cli.common import parse_stage_args


def _config_class() -> type:
    from tus.stages.pretrain import PretrainConfig  # imports torch: only once --help is out of the way

    return PretrainConfig


def main(argv: list[str] | None = None) -> int:
    args = parse_stage_args(
        _config_class,
        list(argv or []),
        prog="tus pretrain",
        description="Self-supervised pretraining of an encoder by a registered method (simclr_organ, mae, ...); writes a new run dir with the encoder export.",
        default_config=None,
    )
    if args is None:
        return 0
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from tus.stages.pretrain import run_pretraining

    run_dir = run_pretraining(args.config, args.resume, allow_config_change=args.allow_config_change)
    if rank_zero_only.rank == 0:
        print(f"encoder: {run_dir / 'encoder'}")
        print(f"run dir: {run_dir}")
    return 0
