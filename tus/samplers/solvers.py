"""Deterministic/multistep solvers from diffusers on the model's own betas: DDIM (Song et al.
2021) and DPM-Solver++(2M) (Lu et al. 2022), x0 estimates clipped to [-1, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from tus.losses.gaussian_diffusion import NoiseSchedule, respace, space_timesteps
from tus.samplers.base import Sampler, initial_noise


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The training timesteps DDIM visits: improved-diffusion's ``space_timesteps(T, "ddimN")`` (0, k, 2k, ... for
    the integer stride k that gives exactly ``steps`` of them). A count no integer stride gives is refused,
    naming the nearest counts that work (with T = 1000: 30 steps are 0, 34, ..., 986, where diffusers' "leading"
    spacing would take 0, 33, ..., 957)."""
    try:
        return space_timesteps(num_timesteps, f"ddim{steps}")
    except ValueError:
        possible = sorted({len(range(0, num_timesteps, stride)) for stride in range(1, num_timesteps + 1)})
        below = max((n for n in possible if n < steps), default=None)
        above = min((n for n in possible if n > steps), default=None)
        nearest = " or ".join(str(n) for n in (below, above) if n is not None)
        raise ValueError(
            f"ddim cannot take {steps} steps over {num_timesteps} timesteps: improved-diffusion's ddimN spacing needs an integer stride k with "
            f"ceil({num_timesteps} / k) = {steps}; the nearest step counts that have one are {nearest}"
        ) from None


def diffusers_scheduler(sampler: str, schedule: NoiseSchedule) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A diffusers solver on the model's own (cosine) betas; x0 estimates are clipped to [-1, 1].

    DDIM runs on the respaced chain of :func:`ddim_timesteps` (see :func:`solver_sample`); DPM-Solver's steps
    are diffusers' "leading" (t = 0, k, 2k, ..., k = T // steps). Neither starts at t = T - 1, where the clipped cosine schedule leaves
    sqrt(alpha_bar) ~ 5e-4 and the first x0 estimate multiplies the noise-prediction error
    by ~2000 (on the benchmark's small model, "leading" was closer to DDPM-1000 than
    "trailing" at 20 and 50 steps).
    """
    betas = schedule.betas.numpy()
    if sampler == "ddim":
        return DDIMScheduler(
            num_train_timesteps=schedule.num_timesteps,
            trained_betas=betas,
            clip_sample=True,
            timestep_spacing="leading",
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
    """Run a diffusers solver; DDIM re-derives its noise estimate from the clipped x0.

    improved-diffusion's DDIM step (``ddim_sample``) clips x0 and then recomputes
    eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) from it, so x0 and eps stay consistent.
    diffusers does the same only with ``use_clipped_model_output=True``; by default it mixes
    the clipped x0 with the model's unclipped eps.

    DDIM follows improved-diffusion's ``ddim_sample_loop`` on ``SpacedDiffusion(space_timesteps(T, "ddimN"))``:
    the scheduler runs every step of the respaced chain (whose alpha_bar are the kept timesteps' own, so each
    step goes from one kept timestep to the previous one, and to alpha_bar = 1 after the last), and the U-Net sees
    the original timestep of each.
    """
    model_timesteps = None
    if sampler == "ddim":
        schedule = respace(schedule, ddim_timesteps(schedule.num_timesteps, steps))
        model_timesteps = schedule.model_timesteps.to(device)
        steps = schedule.num_timesteps
    scheduler = diffusers_scheduler(sampler, schedule)
    scheduler.set_timesteps(steps, device=device)
    step_options = {"use_clipped_model_output": True} if sampler == "ddim" else {}
    x = initial_noise(generators, shape, device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_t = model_timesteps[t] if model_timesteps is not None else t
        output = unet(scheduler.scale_model_input(x, t), model_t).sample.float()
        x = scheduler.step(output[:, : shape[0]], t, x, **step_options).prev_sample
    return x


class DDIMSampler(Sampler):
    name = "ddim"
    default_steps = 50

    def resolve_steps(self, steps: int | None, num_timesteps: int) -> int:
        """As every sampler, and refused up front when improved-diffusion's ddimN spacing has no such count."""
        steps = super().resolve_steps(steps, num_timesteps)
        ddim_timesteps(num_timesteps, steps)
        return steps

    def sample(self, unet, schedule, steps, generators, shape, device):
        return solver_sample(unet, "ddim", schedule, steps, generators, shape, device)


class DPMSolverSampler(Sampler):
    name = "dpm"
    default_steps = 20

    def sample(self, unet, schedule, steps, generators, shape, device):
        return solver_sample(unet, "dpm", schedule, steps, generators, shape, device)
