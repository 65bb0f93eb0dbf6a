"""``tus noisy-labels``: flag noisy labels from recorded losses, or run the whole protocol."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tus.data.images import UsageError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["protocol"]:
        return protocol_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="tus noisy-labels",
        description="Flag samples whose recorded training loss keeps exceeding a threshold; write a report and filtered/flipped manifests. 'tus noisy-labels protocol --help' runs the whole study.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished fine-tuning CV run dirs (with runs/*/losses.csv)")
    parser.add_argument("--threshold", type=float, default=1.0, help="loss above which an occurrence counts as an exceedance")
    parser.add_argument("--min-exceed", type=int, default=3, help="exceedances that make a sample suspicious in a run")
    parser.add_argument("--min-fraction", type=float, default=1.0, help="share of its evaluations in which a sample must be suspicious (1 = all)")
    parser.add_argument("--counting", choices=["per_epoch", "per_draw"], default="per_epoch", help="a point is a sample's mean loss in an epoch (the reference) or each recorded draw")
    parser.add_argument("--manifest", default=None, help="the labelled manifest the runs were trained on (default: from their config.yaml)")
    parser.add_argument("--out", required=True, help="new output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"--out {out} exists; outputs go to a new folder")
    resolved = [Path(run).resolve() for run in args.run_dirs]
    repeated = sorted({str(run) for run in resolved if resolved.count(run) > 1})
    if repeated:
        raise UsageError(f"RUN_DIR given more than once: {', '.join(repeated)} (each run would be counted twice)")
    # pandas and matplotlib: not needed for --help
    from tus.data.outputs import claim_output
    from tus.eval.noisy_labels import FlaggingRule, find_loss_tables, format_report, read_losses, write_report
    from tus.studies.noisy_labels import training_manifest

    rule = FlaggingRule(args.threshold, args.min_exceed, args.min_fraction, args.counting)
    manifest = Path(args.manifest) if args.manifest else training_manifest(args.run_dirs)
    with claim_output(out, "--out"):  # writable and locked before the losses are read
        report = write_report(read_losses(find_loss_tables(args.run_dirs)), manifest, rule, out)
    from tus.tracking import track_noisy_labels

    track_noisy_labels(out, manifest)
    print(format_report(report))
    print(f"written to {out}")
    return 0


def protocol_main(argv: list[str]) -> int:
    """``tus noisy-labels protocol STUDY [options]``: the protocol is a study type now, run by
    the one study runner (``tus experiment run``); this name is kept as a shortcut."""
    from tus.cli.experiment import main as experiment_main

    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: tus noisy-labels protocol STUDY [tus experiment run options]\n\n"
            "Runs a study with a noisy_labels: block (flagging CVs, flags, then its arms on the complete,\n"
            "filtered and flipped labels), e.g. studies/tab1 or studies/noisy_labels_cpu; same as\n"
            "'tus experiment run STUDY ...'."
        )
        return 0
    return experiment_main(["run", *argv])
