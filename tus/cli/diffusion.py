"""``tus diffusion``: argv -> DiffusionConfig -> :func:`tus.stages.diffusion.run_diffusion`."""

from __future__ import annotations

from tus.cli.common import parse_stage_args


def _config_class() -> type:
    from tus.stages.diffusion import DiffusionConfig  # imports torch: only once --help is out of the way

    return DiffusionConfig


def main(argv: list[str] | None = None) -> int:
    args = parse_stage_args(
        _config_class,
        list(argv or []),
        prog="tus diffusion",
        description="Train the improved DDPM (learned variance, hybrid loss); writes a new run dir with the EMA U-Net export.",
        default_config=None,
    )
    if args is None:
        return 0
    from tus.stages.diffusion import run_diffusion

    run_dir = run_diffusion(args.config, args.resume, allow_config_change=args.allow_config_change)
    print(f"run dir: {run_dir}")
    return 0
