"""What every training command shares: ``--config`` (repeatable, a path or a packaged name),
``--dotted.key=value`` overrides, ``--print_config``, ``--resume``/``--allow-config-change``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from tus.config import ConfigError, load_config, packaged_config_names, to_yaml

T = TypeVar("T")


@dataclass
class StageArgs(Generic[T]):
    config: T
    resume: Path | None
    allow_config_change: bool


def parse_stage_args(
    cls: type[T] | Callable[[], type[T]], argv: list[str], *, prog: str, description: str, default_config: str | None, resume_flags: tuple[str, ...] = ("--resume",)
) -> StageArgs[T] | None:
    """Parse a stage's argv into its config; None when ``--print_config`` printed it.

    ``cls`` is the config dataclass or a function returning it, called only after ``--help``
    was handled: a stage whose config module imports torch keeps ``--help`` instant."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=(
            "Every config key is an option: --data.image_size=128, --trainer.max_epochs=5, --trainer.fast_dev_run=true "
            "(see --print_config for the keys). Packaged configs: " + ", ".join(packaged_config_names())
        ),
    )
    parser.add_argument("--config", action="append", default=[], help="YAML config: a path or a packaged name such as finetune/cpu (repeatable; later ones win)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument(*resume_flags, dest="resume", metavar="RUN_DIR", help="continue this run dir: with its saved config (plus any overrides), or with --config/overrides that give the same config")
    parser.add_argument("--allow-config-change", action="store_true", help="with --resume: accept overrides that change the saved config (recorded in the run dir)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if "=" not in o]
    if unknown:
        raise ConfigError(f"{prog}: options take the form --key.path=value; not understood: {' '.join(unknown)}")
    config_class: type[T] = cls if isinstance(cls, type) else cls()
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir}: not a run dir to resume (no config.yaml)")
        # Without --config the saved config is resumed (plus overrides); with it, the command
        # that started the run can be repeated as it was: the config it builds must equal the
        # saved one (the stage refuses a difference unless --allow-config-change).
        config = load_config(config_class, args.config or run_dir / "config.yaml", overrides)
    else:
        configs = args.config or ([default_config] if default_config else [])
        if not configs:
            raise ConfigError(f"{prog}: give --config CONFIG (a path or one of: {', '.join(packaged_config_names())})")
        config = load_config(config_class, configs, overrides)
    if args.print_config:
        sys.stdout.write(to_yaml(config))
        return None
    return StageArgs(config, Path(args.resume) if args.resume else None, args.allow_config_change)
