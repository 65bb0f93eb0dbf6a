"""Training images/s of the diffusion stage (DiffusionModule with its data module in the
Trainer the stage builds: precision 'auto', ChannelsLast('auto')) against the fastest plain
PyTorch loop for this hardware on a pre-made batch (fp32 NCHW, fp32 channels_last, bf16 where
native; see benchmarks/common.py). The plain loop does what the training step does: random
flips, timesteps and noise, the U-Net, the hybrid loss, AdamW and the EMA update.
Target: >= 0.95.

    python benchmarks/diffusion_throughput.py                   # a small U-Net at 32 px (CPU)
    python benchmarks/diffusion_throughput.py --device cuda --image-size 128 --base-channels 128 --batch-size 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
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
from tus.data.datamodules import ImageSourceConfig
from tus.data.pools import DiffusionDataConfig, DiffusionDataModule
from tus.losses.gaussian_diffusion import hybrid_loss, q_sample
from tus.methods.iddpm import (
    DiffusionModule,
    EmaConfig,
    OptimConfig,
    ProcessConfig,
    UNetConfig,
)
from tus.stages.diffusion import DiffusionConfig


def new_module(args) -> DiffusionModule:
    torch.manual_seed(0)
    unet = UNetConfig(
        sample_size=args.image_size,
        base_channels=args.base_channels,
        channel_mults=tuple(args.channel_mults),
        layers_per_block=1,
        attention_resolutions=(args.image_size // 2 ** (len(args.channel_mults) - 1),),
        attention_head_dim=args.base_channels,
    )
    return DiffusionModule(unet, ProcessConfig(), OptimConfig(), EmaConfig(), seed=0)


def plain_throughput(setting: Setting, device: torch.device, args) -> float:
    module = new_module(args).to(device, memory_format=setting.memory_format()).train()
    optimizer = module.configure_optimizers()
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size, device=device) * 2 - 1
    x = x.contiguous(memory_format=setting.memory_format())
    step_count = [0]

    def step() -> None:
        flip = torch.rand(x.shape[0], generator=generator, device=device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x.flip(-1), x)
        t, weights = module.timestep_sampler.sample(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        xt = q_sample(module.schedule, x0, t, noise)
        with setting.autocast(device):
            output = module.unet(xt, t).sample.float()
        loss = (hybrid_loss(module.schedule, output, x0, xt, t, noise, module.process.vlb_weight).loss * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_count[0] += 1
        module.ema.update(module.unet, step=step_count[0])

    return args.steps * args.batch_size / time_steps(step, args.steps, args.warmup, device)


def tus_throughput(manifest: Path, run_dir: Path, device: torch.device, args) -> float:
    data = DiffusionDataConfig(
        sources=[ImageSourceConfig(manifest=str(manifest))],
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        steps_per_epoch=args.warmup + args.steps,
    )
    timer = StepTimer(args.warmup)
    # The memory format the diffusion stage's config asks for on this device (diffusion/cpu on CPU).
    stage = load_config(DiffusionConfig, "diffusion/cpu" if device.type == "cpu" else "diffusion/paper")
    trainer = tus_trainer(run_dir, device, args.warmup + args.steps, timer, channels_last=stage.trainer.channels_last)
    trainer.fit(new_module(args), datamodule=DiffusionDataModule(data, seed=0))
    return args.steps * args.batch_size / timer.seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_arguments(parser, image_size=32, batch_size=16, steps=30)  # 15 steps (2 s) varied by +-5%
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--channel-mults", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(machine_line(device))
    print(f"diffusion U-Net {args.base_channels}x{args.channel_mults}, {args.image_size}px, batch {args.batch_size}, {args.steps} timed steps after {args.warmup}")
    plain = {s.name: plain_throughput(s, device, args) for s in plain_settings(device)}
    with phantom_workspace(40, args.image_size) as (tmp, paths):
        tus = tus_throughput(paths.labeled_manifest, tmp / "run", device, args)
    report("stage Trainer + data pipeline", tus, plain, 0.95)


if __name__ == "__main__":
    main()
