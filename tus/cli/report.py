"""``tus report``: re-render the figures and summaries of finished runs from their CSVs."""

from __future__ import annotations

import argparse

from tus.stages.report import report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tus report",
        description="Re-render the figures (figures/*.png, .pdf and their data as .csv) and summary.md of finished runs from the files they wrote; nothing is trained. "
        "A RUN_DIR is a CV run, a study, a pretraining or a diffusion run, or a folder holding such runs (e.g. a demo folder).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the CIs in ROC/PR legends (the stages use 1000)")
    args = parser.parse_args(argv)
    for run_dir, written in report(args.run_dirs, n_boot=args.n_boot).items():
        figures = sorted({p.stem for p in written})
        print(f"{run_dir}: {len(figures)} figure(s) {', '.join(figures) if figures else '(nothing to draw)'}")
    return 0
