"""``tus diffusion``: argv -> DiffusionConfig -> :func:`tus.stages.diffusion.run_diffusion`."""

from __future__ import annotations

from tus.cli.common import parse_stage_args


def main(argv: list[str] | None = None) -> int:
    from tus.stages.diffusion import DiffusionConfig, run_diffusion

    args = parse_stage_args(
        DiffusionConfig,
        list(argv or []),
        prog="tus diffusion",
        description="Train the improved DDPM (learned variance, hybrid loss); writes a new run dir with the EMA U-Net export.",
        default_config=None,
    )
    if args is None:
        return 0
    run_dir = run_diffusion(args.config, args.resume, allow_config_change=args.allow_config_change)
    print(f"run dir: {run_dir}")
    return 0
