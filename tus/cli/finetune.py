"""``tus finetune-cv``: argv -> FineTuneCVConfig -> :func:`tus.stages.finetune_cv.run_cv`."""

from __future__ import annotations

from tus.cli.common import parse_stage_args


def finetune_cv_main(argv: list[str]) -> int:
    from tus.stages.configs import FineTuneCVConfig  # torch-free: --help and --print_config stay instant

    args = parse_stage_args(
        FineTuneCVConfig,
        argv,
        prog="tus finetune-cv",
        description="Patient-grouped K-fold x seeds fine-tuning; writes a new run dir with runs.csv and summary.md.",
        default_config="finetune/paper",
        resume_flags=("--resume", "--run-dir"),
    )
    if args is None:
        return 0
    from tus.stages.finetune_cv import run_cv

    run_dir = run_cv(args.config, args.resume, allow_config_change=args.allow_config_change)
    print((run_dir / "summary.md").read_text())
    print(f"run dir: {run_dir}")
    return 0
