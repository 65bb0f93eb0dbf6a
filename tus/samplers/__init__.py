"""Samplers of a trained diffusion model, looked up by name (or an importable class path).

Adding one: a :class:`tus.samplers.base.Sampler` subclass in a file here and one line in
``SAMPLERS``; ``tus sample --sampler``, the training-time sample grids and the benchmarks
find it by name. A sampler outside tus: ``--sampler my_package.module.MySampler``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from diffusers import UNet2DModel

from tus.config import resolve_class
from tus.losses.gaussian_diffusion import NoiseSchedule
from tus.samplers.base import Sampler
from tus.samplers.guidance import GuidedUNet

# name -> "module:Class"
SAMPLERS: dict[str, str] = {
    "ddpm": "tus.samplers.ancestral:DDPMSampler",
    "respaced": "tus.samplers.ancestral:RespacedSampler",
    "ddim": "tus.samplers.solvers:DDIMSampler",
    "dpm": "tus.samplers.solvers:DPMSolverSampler",
}


def get_sampler(name: str) -> Sampler:
    """A new sampler by registry name or ``package.module.Class`` path."""
    return resolve_class(name, SAMPLERS, Sampler, "sampler")()


def resolve_steps(sampler: str, steps: int | None, num_timesteps: int) -> int:
    """The steps ``sampler`` will run for a request of ``steps`` (None: its default)."""
    return get_sampler(sampler).resolve_steps(steps, num_timesteps)


@torch.no_grad()
def sample_images(
    unet: UNet2DModel,
    schedule: NoiseSchedule,
    sampler: str,
    steps: int | None,
    seeds: Sequence[int],
    device: torch.device | str = "cpu",
    precision: str = "32",
    labels: Sequence[int] | None = None,
    guidance: float = 0.0,
) -> torch.Tensor:
    """Images in [-1, 1], shape (len(seeds), C, H, W): one per seed, independent of batching.

    A class-conditional U-Net draws image i of class ``labels[i]`` with classifier-free guidance scale
    ``guidance`` (:class:`tus.samplers.guidance.GuidedUNet`); without labels, unconditionally.
    """
    device = torch.device(device)
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels for {len(seeds)} seeds")
    model = GuidedUNet(unet, labels, guidance)
    method = get_sampler(sampler)
    steps = method.resolve_steps(steps, schedule.num_timesteps)
    config = unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with autocast:
        images = method.sample(model, schedule, steps, generators, shape, device)
    return images.float().clamp(-1, 1)
