"""``tus data``: check a manifest, generate the phantom dataset, crop screenshots, find labelled
images in a pool (leakage)."""

from __future__ import annotations

import argparse
from collections import Counter

from tus.data.images import read_grayscale


def _dicom_frames(value: str) -> str:
    from tus.config import ConfigError
    from tus.data.configs import check_dicom_frames

    try:
        return check_dicom_frames(value, "--dicom-frames")
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tus data", description="Dataset tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate a manifest; prints every problem and exits 1 if any")
    check.add_argument("manifest")
    check.add_argument("--unlabeled", action="store_true", help="labels and patient ids are optional (pretraining pools)")
    check.add_argument("--folds", type=int, default=3, help="fold count the classes must fill (labelled data)")
    check.add_argument("--label-names", default=None, metavar="A,B,C", help="the classes, index = label, as data.label_names (K > 2 classes written as indices)")
    check.add_argument("--dicom-frames", default="middle", type=_dicom_frames, metavar="all|first|middle|K", help="rows of a multi-frame DICOM, as data.dicom_frames (default: middle)")

    phantom = commands.add_parser("phantom", help="generate the embedded phantom dataset (labelled set + unlabelled two-organ pool)")
    phantom.add_argument("--out", required=True)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--patients", type=int, default=60)
    phantom.add_argument("--image-size", type=int, default=128)
    phantom.add_argument("--pool-size", type=int, default=300)
    phantom.add_argument("--label-noise", type=float, default=0.0, help="fraction of labels flipped on purpose")
    phantom.add_argument("--dicom", action="store_true", help="write the labelled set as DICOM (single-frame files and a few multi-frame cine loops)")
    phantom.add_argument("--positive-fraction", type=float, default=None, help="share of lesioned patients (default 0.2; with --classes 3, 2/3: one third per class)")
    phantom.add_argument(
        "--classes", type=int, choices=(2, 3), default=2, help="3: homogeneous / focal_lesion / diffuse labels 0/1/2 (train with --data.label_names '[homogeneous,focal_lesion,diffuse]')"
    )

    crop = commands.add_parser("crop", help="detect fields of view, split dual views, write crops + a new manifest")
    crop.add_argument("manifest")
    crop.add_argument("--out", required=True, help="new folder for crops, manifest.csv and preview.png")
    crop.add_argument("--box", action="append", default=None, metavar="X0,Y0,X1,Y1", help="fixed box(es) instead of detection; repeat for dual view")
    crop.add_argument("--max-views", type=int, default=2)
    crop.add_argument("--dicom-frames", default="middle", type=_dicom_frames, metavar="all|first|middle|K", help="frames of a multi-frame DICOM to crop (default: middle)")

    overlap = commands.add_parser("overlap", help="images a pool shares with the labelled set (same file, same pixels, near duplicates, same patient), per labelled fold")
    overlap.add_argument("pool", help="the pool's manifest (a patient_id column in the labelled set's ids links its images to labelled patients)")
    overlap.add_argument("labeled", help="the labelled manifest; its 'fold' column (a CV run's folds.csv) gives the folds")
    overlap.add_argument("--folds", type=int, default=3, help="without a 'fold' column: folds to assign, as finetune-cv does")
    overlap.add_argument("--fold-seed", type=int, default=0, help="without a 'fold' column: the fold seed (data.fold_seed)")
    overlap.add_argument("--max-distance", type=int, default=None, help="near duplicates: Hamming distance in bits of 256 (default: tus.data.near_duplicates.MAX_DISTANCE)")
    overlap.add_argument("--exact", action="store_true", help="identical files and pixels only (no near duplicates)")
    overlap.add_argument("--list", type=int, default=20, metavar="N", help="print the first N matched pairs (0: none)")

    args = parser.parse_args(argv)
    return {"check": run_check, "phantom": run_phantom, "crop": run_crop, "overlap": run_overlap}[args.command](args)


def run_check(args) -> int:
    from tus.data.manifest import ManifestError, check_manifest, summarize

    try:
        frame, problems = check_manifest(
            args.manifest,
            require_labels=not args.unlabeled,
            num_folds=None if args.unlabeled else args.folds,
            dicom_frames=args.dicom_frames,
            label_names=[name.strip() for name in args.label_names.split(",")] if args.label_names else None,
        )
    except (ManifestError, FileNotFoundError) as error:
        print(f"error: {error}")
        return 1
    if problems:
        for problem in problems:
            print(problem)
        print(f"{args.manifest}: {len(problems)} problem(s)")
        return 1
    print(summarize(frame))
    sizes = Counter(read_grayscale(p).shape for p in frame["abs_path"])
    common = ", ".join(f"{w}x{h} ({n})" for (h, w), n in sizes.most_common(5))
    print(f"image sizes (WxH): {common}{' ...' if len(sizes) > 5 else ''}")
    print(f"{args.manifest}: OK")
    return 0


def run_phantom(args) -> int:
    from tus.data.phantom import generate_phantom

    paths = generate_phantom(
        args.out,
        num_patients=args.patients,
        image_size=args.image_size,
        pool_size=args.pool_size,
        seed=args.seed,
        label_noise=args.label_noise,
        dicom=args.dicom,
        classes=args.classes,
        positive_fraction=args.positive_fraction if args.positive_fraction is not None else (0.2 if args.classes == 2 else 2 / 3),
    )
    print(f"labelled manifest:   {paths.labeled_manifest}")
    print(f"unlabelled manifest: {paths.unlabeled_manifest}")
    return 0


def run_crop(args) -> int:
    from tus.data.crop import crop_manifest

    boxes = [tuple(int(v) for v in box.split(",")) for box in args.box] if args.box else None
    manifest = crop_manifest(args.manifest, args.out, fixed_boxes=boxes, max_views=args.max_views, dicom_frames=args.dicom_frames)
    print(f"crops and manifest: {manifest}")
    return 0


def run_overlap(args) -> int:
    from tus.data.manifest import load_manifest
    from tus.data.near_duplicates import MAX_DISTANCE, NearDuplicateConfig
    from tus.data.overlap import find_overlap, format_matches, format_overlap, labeled_folds, overlap_report

    pool = load_manifest(args.pool, require_labels=False, decode_images=False)
    labeled = load_manifest(args.labeled, require_labels=True, decode_images=False)
    folds = labeled_folds(labeled, args.folds, args.fold_seed)
    near = None if args.exact else NearDuplicateConfig(MAX_DISTANCE if args.max_distance is None else args.max_distance)
    overlap = find_overlap(pool, labeled, folds, near)
    print(format_overlap(overlap_report(overlap, folds, len(pool))))
    if args.list and len(overlap):
        print(format_matches(overlap, args.list))
    return 0
