"""The ``tus`` command: one entry point, one subcommand per stage.

Stage subcommands live next to their code and are imported only when called, so
``tus data check`` starts fast and a broken optional stage cannot break the others.
"""

from __future__ import annotations

import importlib
import sys
import warnings

# subcommand -> "module:function" taking argv and returning an exit code
STAGES = {
    "data": ("tus.cli.data:main", "check, crop or generate (phantom) datasets"),
    "finetune-cv": ("tus.cli.finetune:finetune_cv_main", "patient-grouped K-fold x seeds fine-tuning"),
    "pretrain": ("tus.cli.pretrain:main", "organ-supervised contrastive pretraining"),
    "diffusion": ("tus.cli.diffusion:main", "train the improved-DDPM generator"),
    "sample": ("tus.cli.sample:main", "sample images from a trained diffusion model"),
    "metrics": ("tus.cli.synthetic:metrics_main", "FID, IS, precision/recall of generated images"),
    "filter": ("tus.cli.synthetic:filter_main", "k-NN manifold filter of generated images"),
    "noisy-labels": ("tus.cli.noisy_labels:main", "flag noisy labels from per-sample loss trajectories"),
    "explain": ("tus.cli.explain:main", "Grad-CAM++ overlays and marker sensitivity"),
    "experiment": ("tus.cli.experiment:main", "run a study's arms and render its table"),
    "demo": ("tus.cli.demo:main", "the whole pipeline on the generated phantom dataset"),
}


def main(argv: list[str] | None = None) -> int:
    # Library deprecation chatter (Lightning's pytree use) says nothing to a tus user.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        usage = "\n".join(f"  {name:<13} {help_text}" for name, (_, help_text) in STAGES.items())
        print(f"usage: tus <command> [options]\n\ncommands:\n{usage}\n\n'tus <command> --help' for a command's options.")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    target, _ = STAGES[argv[0]]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(argv[1:]) or 0)






if __name__ == "__main__":
    sys.exit(main())
