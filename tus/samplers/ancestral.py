"""Ancestral sampling with the learned variance (Nichol & Dhariwal 2021, Sec. 4): all T steps
(``ddpm``) or a respaced subsequence of them (``respaced``, their Eq. 19-20)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DModel

from tus.losses.gaussian_diffusion import NoiseSchedule, p_mean_variance, respace, space_timesteps
from tus.samplers.base import Sampler, initial_noise


def ancestral_sample(unet: UNet2DModel, schedule: NoiseSchedule, generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """x_T ~ N(0, I), then x_{t-1} ~ p(x_{t-1} | x_t) with the learned variance, down to x_0."""
    x = initial_noise(generators, shape, device)
    for index in reversed(range(schedule.num_timesteps)):
        t = torch.full((len(generators),), index, device=device, dtype=torch.long)
        model_t = torch.full_like(t, int(schedule.model_timesteps[index]))
        output = unet(x, model_t).sample.float()
        prediction = p_mean_variance(schedule, output, x, t, clip_denoised=True)
        if index == 0:
            x = prediction.mean
        else:
            x = prediction.mean + torch.exp(0.5 * prediction.log_variance) * initial_noise(generators, shape, device)
    return x


class DDPMSampler(Sampler):
    """Every step of the training schedule (the reference's sampler, slowest)."""

    name = "ddpm"
    default_steps = None

    def sample(self, unet, schedule, steps, generators, shape, device):
        return ancestral_sample(unet, schedule, generators, shape, device)


class RespacedSampler(Sampler):
    """Ancestral steps on an evenly respaced subsequence, with the betas recomputed for it."""

    name = "respaced"
    default_steps = 250

    def sample(self, unet, schedule, steps, generators, shape, device):
        chain = schedule if steps == schedule.num_timesteps else respace(schedule, space_timesteps(schedule.num_timesteps, steps))
        return ancestral_sample(unet, chain, generators, shape, device)
