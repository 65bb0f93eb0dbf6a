"""Samplers of a trained diffusion model: ancestral DDPM (all or respaced steps), DDIM and
DPM-Solver++ (diffusers schedulers over the same noise schedule)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from tus.losses.gaussian_diffusion import NoiseSchedule, p_mean_variance, respace, space_timesteps


def resolve_steps(sampler: str, steps: int | None, num_timesteps: int) -> int:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    if sampler == "ddpm":
        if steps not in (None, num_timesteps):
            raise ValueError(f"the ddpm sampler runs all {num_timesteps} steps, not {steps}; the respaced sampler takes fewer")
        return num_timesteps
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"{sampler} steps must be in [1, {num_timesteps}], got {steps}")
    return steps


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One standard-normal draw per image, each from its own (CPU) generator."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def ancestral_sample(
    unet: UNet2DModel, schedule: NoiseSchedule, generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
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


def diffusers_scheduler(sampler: str, schedule: NoiseSchedule) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A diffusers solver on the model's own (cosine) betas; x0 estimates are clipped to [-1, 1].

    Steps are "leading" (t = 0, k, 2k, ..., as improved-diffusion's ``ddimK`` respacing), so
    a short chain does not start at t = T - 1, where the clipped cosine schedule leaves
    sqrt(alpha_bar) ~ 5e-4 and the first x0 estimate multiplies the noise-prediction error
    by ~2000 (on the benchmark's small model, "leading" was closer to DDPM-1000 than
    "trailing" at 20 and 50 steps).
    """
    betas = schedule.betas.numpy()
    if sampler == "ddim":
        return DDIMScheduler(
            num_train_timesteps=schedule.num_timesteps, trained_betas=betas, clip_sample=True, timestep_spacing="leading",
        )
    return DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=betas,
        algorithm_type="dpmsolver++",
        solver_order=2,
        # With sample_max_value 1 dynamic thresholding is a plain clip of x0 to [-1, 1].
        thresholding=True,
        sample_max_value=1.0,
        # The cosine schedule's log-SNR diverges at t = T; diffusers' advice is to clip it.
        lambda_min_clipped=-5.1,
        timestep_spacing="leading",
    )


def solver_sample(
    unet: UNet2DModel,
    sampler: str,
    schedule: NoiseSchedule,
    steps: int,
    generators: Sequence[torch.Generator],
    shape: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    scheduler = diffusers_scheduler(sampler, schedule)
    scheduler.set_timesteps(steps, device=device)
    x = initial_noise(generators, shape, device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = unet(scheduler.scale_model_input(x, t), t).sample.float()
        x = scheduler.step(output[:, : shape[0]], t, x).prev_sample
    return x


@torch.no_grad()
def sample_images(
    unet: UNet2DModel,
    schedule: NoiseSchedule,
    sampler: str,
    steps: int,
    seeds: Sequence[int],
    device: torch.device | str = "cpu",
    precision: str = "32",
) -> torch.Tensor:
    """Images in [-1, 1], shape (len(seeds), C, H, W): one per seed, independent of batching."""
    device = torch.device(device)
    steps = resolve_steps(sampler, steps, schedule.num_timesteps)
    config = unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with autocast:
        if sampler in ("ddpm", "respaced"):
            chain = schedule if steps == schedule.num_timesteps else respace(schedule, space_timesteps(schedule.num_timesteps, steps))
            images = ancestral_sample(unet, chain, generators, shape, device)
        else:
            images = solver_sample(unet, sampler, schedule, steps, generators, shape, device)
    return images.float().clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (B, 1, H, W) -> uint8 (B, H, W), rounding to the nearest level."""
    return ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


SAMPLERS = ("ddpm", "respaced", "ddim", "dpm")


DEFAULT_STEPS = {"respaced": 250, "ddim": 50, "dpm": 20}
