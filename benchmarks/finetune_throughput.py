"""Training images/s of the fine-tuning stage (FineTuneModule in the Trainer the stage builds,
with its data pipeline: disk cache, augmentation, weighted sampler) against the fastest plain
PyTorch loop on pre-made tensors for this hardware (see benchmarks/common.py). Target: >= 0.95.

    python benchmarks/finetune_throughput.py [--image-size 64] [--batch-size 32] [--steps 15] [--patients 220]
    python benchmarks/finetune_throughput.py --compile      # trainer.compile: true (see tus.callbacks.performance)
    python benchmarks/finetune_throughput.py --device cuda --image-size 224 --batch-size 128 --steps 50
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    Setting,
    StepTimer,
    machine_line,
    phantom_workspace,
    plain_settings,
    report,
    time_steps,
    timing_arguments,
    tus_trainer,
)

from tus.config import load_config
from tus.data.datamodules import LabeledDataConfig, LabeledDataModule
from tus.data.folds import assign_folds
from tus.data.manifest import load_manifest
from tus.methods.classifier import FineTuneModule, FineTuneOptimConfig
from tus.models.backbones import BackboneConfig
from tus.stages.finetune_cv import FineTuneCVConfig


def new_module(args) -> FineTuneModule:
    torch.manual_seed(0)
    return FineTuneModule(BackboneConfig(name=args.model, init="scratch"), FineTuneOptimConfig())


def tus_throughput(manifest: Path, run_dir: Path, device: torch.device, args) -> float:
    frame = load_manifest(manifest)
    data = LabeledDataConfig(manifest=str(manifest), image_size=args.image_size, batch_size=args.batch_size, num_workers=args.num_workers)
    datamodule = LabeledDataModule(data, frame, assign_folds(frame, 3, 0), test_fold=0, seed=0)
    timer = StepTimer(args.warmup)
    # As tus.stages.finetune_cv runs it without inner validation: no validation batches.
    trainer = tus_trainer(run_dir, device, args.warmup + args.steps, timer, limit_val_batches=0, compile=args.compile)
    trainer.fit(new_module(args), datamodule=datamodule)
    if args.compile:
        print(f"trainer.compile: {args.warmup} warmup steps (compilation included) took {timer.warmup_seconds():.1f} s")
    return args.steps * args.batch_size / timer.seconds()


def plain_throughput(setting: Setting, device: torch.device, args) -> float:
    module = new_module(args).to(device, memory_format=setting.memory_format()).train()
    # The optimiser tus builds (AdamW over the backbone/head groups); its schedule costs nothing per step.
    optimizer = torch.optim.AdamW(module.param_groups(), weight_decay=module.optim_config.weight_decay, fused=True)
    images = torch.randn(args.batch_size, 1, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=setting.memory_format())
    labels = torch.randint(0, 2, (args.batch_size,), device=device)

    def step() -> None:
        with setting.autocast(device):
            loss = F.cross_entropy(module(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return args.steps * args.batch_size / time_steps(step, args.steps, args.warmup, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    timing_arguments(parser, image_size=64, batch_size=32, steps=15)
    # The reference's 220 patients (2-5 phantom images each; the reference has 4 a patient):
    # per-epoch work (loader start, epoch-end hooks) weighs as in a real CV, not as in a
    # 6-batch toy epoch.
    parser.add_argument("--patients", type=int, default=220)
    # Default: what the stage's config for the device uses (finetune/cpu or finetune/paper).
    # On 2 cores a worker has no spare core to augment on (measured: 0.90 with one, 0.92 without).
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="alternating plain/tus rounds; each keeps its best")
    parser.add_argument("--compile", action="store_true", help="time the stage with trainer.compile: true (compilation in the warmup)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.num_workers is None:
        args.num_workers = load_config(FineTuneCVConfig, "finetune/cpu" if device.type == "cpu" else "finetune/paper").data.num_workers
    print(machine_line(device))
    print(f"fine-tuning {args.model}, {args.image_size}px, batch {args.batch_size}, {args.num_workers} loader worker(s), {args.steps} timed steps after {args.warmup}, best of {args.rounds} rounds")
    # Plain and tus alternate and each keeps its best round (as timeit does): a shared machine's
    # speed drifts by a few percent within a minute, which would otherwise favour whichever ran first.
    settings = plain_settings(device)
    plain = dict.fromkeys((s.name for s in settings), 0.0)
    tus = 0.0
    with phantom_workspace(args.patients, args.image_size) as (tmp, paths):
        for round_ in range(args.rounds):
            for setting in settings:
                plain[setting.name] = max(plain[setting.name], plain_throughput(setting, device, args))
            tus = max(tus, tus_throughput(paths.labeled_manifest, tmp / f"run{round_}", device, args))
    report("stage Trainer + data pipeline" + (", compiled" if args.compile else ""), tus, plain, 0.95)


if __name__ == "__main__":
    main()
