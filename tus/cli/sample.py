"""``tus sample``: argv -> :func:`tus.stages.sample.generate`."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tus sample", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="export .safetensors, Lightning .ckpt, or a diffusion run dir")
    parser.add_argument("--n", type=int, required=True, help="number of images the folder should hold")
    parser.add_argument("--out", required=True, help="output folder (new, or one to continue)")
    parser.add_argument("--sampler", default="ddpm", help="a registered sampler (ddpm, respaced, ddim, dpm: tus.samplers.SAMPLERS) or a class path")
    parser.add_argument("--steps", type=int, default=None, help="steps (default: the sampler's; ddpm runs all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--label", type=int, default=None, help="class of every image (a class-conditional model, unet.num_classes)")
    parser.add_argument("--labels-from", default=None, help="labelled manifest whose class mix to sample: image i takes row (i mod rows)'s label")
    parser.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale w: eps = (1 + w) eps(x, y) - w eps(x); 0: plain conditional")
    args = parser.parse_args(argv)
    from tus.stages.sample import generate  # torch and diffusers: not needed for --help

    manifest = generate(
        args.checkpoint,
        args.out,
        args.n,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
        label=args.label,
        labels_from=args.labels_from,
        guidance=args.guidance,
    )
    print(f"{args.n} images in {manifest.parent} (manifest: {manifest})")
    return 0
