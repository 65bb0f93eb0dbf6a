"""``tus noisy-labels``: flag noisy labels from recorded losses, or run the whole protocol."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tus.config import ConfigError
from tus.eval.noisy_labels import FlaggingRule, LossTableError, find_loss_tables, format_report, read_losses, write_report
from tus.studies.noisy_labels import load_protocol, run_protocol, training_manifest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["protocol"]:
        return protocol_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tus noisy-labels", description="Flag samples whose recorded training loss keeps exceeding a threshold; write a report and filtered/flipped manifests. 'tus noisy-labels protocol --help' runs the whole study.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished fine-tuning CV run dirs (with runs/*/losses.csv)")
    parser.add_argument("--threshold", type=float, default=1.0, help="loss above which an occurrence counts as an exceedance")
    parser.add_argument("--min-exceed", type=int, default=3, help="exceedances that make a sample suspicious in a run")
    parser.add_argument("--min-fraction", type=float, default=1.0, help="share of its evaluations in which a sample must be suspicious (1 = all)")
    parser.add_argument("--manifest", default=None, help="the labelled manifest the runs were trained on (default: from their config.yaml)")
    parser.add_argument("--out", required=True, help="new output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; outputs go to a new folder")
    try:
        rule = FlaggingRule(args.threshold, args.min_exceed, args.min_fraction)
        manifest = Path(args.manifest) if args.manifest else training_manifest(args.run_dirs)
        report = write_report(read_losses(find_loss_tables(args.run_dirs)), manifest, rule, out)
    except (LossTableError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}")
        return 1
    print(format_report(report))
    print(f"written to {out}")
    return 0


def protocol_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tus noisy-labels protocol", description="The noisy-label study: flagging CVs per initialisation, flagging, then fine-tuning on complete/filtered/flipped data (Tab. 1).")
    parser.add_argument("--config", default="experiments/noisy_labels.yaml")
    parser.add_argument("--out", default=None, help="protocol dir to resume (default: a new one under output_root)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.max_epochs=5 noisy_labels.min_exceed=4")
    args = parser.parse_args(argv)
    try:
        finetune, protocol = load_protocol(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}")
        return 2
    run_protocol(finetune, protocol, args.out)
    return 0
