"""``tus export``: a classifier as ONNX or TorchScript with preprocess.json and a model card (:func:`tus.stages.export.run_export`)."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tus export", description="Export a classifier (fold model, refit model or a CV run's fold ensemble) with preprocess.json and a model card.")
    parser.add_argument("model", help="a CV run dir (its fold ensemble, one graph), or one model folder (runs/fold<F>-seed<S>, runs/refit-seed<S>)")
    parser.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    parser.add_argument("--out", required=True, help="a new or empty folder")
    parser.add_argument("--seed", type=int, default=None, help="with a CV run dir: the fold models of this seed only")
    parser.add_argument("--refit", action="store_true", help="with a CV run dir: its refit model(s)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)

    from tus.stages.export import run_export

    out = run_export(args.model, args.format, args.out, seed=args.seed, refit=args.refit)
    print(f"exported to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0
