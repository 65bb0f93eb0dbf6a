"""``tus wandb export RUN_DIR...``: push offline W&B runs, their artifacts and lineage later."""

from __future__ import annotations

import argparse
from pathlib import Path

from tus.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tus wandb",
        description="W&B runs are written offline (in each run dir's wandb/). 'tus wandb export RUN_DIR...' uploads them with their artifacts "
        "(wandb sync) and then records the artifact uses (pretraining encoder -> CV -> predictions) that W&B cannot record offline. Needs 'wandb login' first.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="upload offline runs, artifacts and lineage")
    export.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs, study dirs or demo folders (searched for wandb/offline-run-*)")
    export.add_argument("--entity", default=None, help="W&B entity (team or user); default: your default entity")
    export.add_argument("--dry-run", action="store_true", help="list what would be uploaded and linked, upload nothing")
    args = parser.parse_args(argv)
    from tus.tracking import export_offline

    missing = [d for d in args.run_dirs if not Path(d).is_dir()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such folder")
    actions = export_offline([Path(d) for d in args.run_dirs], entity=args.entity, dry_run=args.dry_run)
    if not actions:
        raise ConfigError(f"no offline W&B runs under {', '.join(args.run_dirs)} (were they run with logging.wandb=false or WANDB_MODE=disabled?)")
    print("\n".join(actions) if args.dry_run else f"exported {sum(a.startswith('sync') for a in actions)} run(s), {sum(a.startswith('use') for a in actions)} artifact use(s)")
    return 0
