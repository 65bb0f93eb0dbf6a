"""DDIM with clipping equals improved-diffusion's DDIM step (``GaussianDiffusion.ddim_sample``, eta = 0)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tus.losses.gaussian_diffusion import NoiseSchedule
from tus.samplers.base import initial_noise
from tus.samplers.solvers import DDIMSampler, solver_sample

T = 50
STEPS = 10
SHAPE = (1, 8, 8)
SEEDS = (0, 1, 2)


class AnalyticNoiseModel(torch.nn.Module):
    """eps_hat(x, t) = 0.5 x + 0.01 t: far from x's true noise, so x0 estimates leave [-1, 1].

    Returns the learned-variance channels too (zeros), as the trained U-Net does.
    """

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        eps = 0.5 * x + 0.01 * torch.as_tensor(t, dtype=x.dtype)
        return SimpleNamespace(sample=torch.cat([eps, torch.zeros_like(eps)], dim=1))


def improved_diffusion_ddim(schedule: NoiseSchedule, x: torch.Tensor, clip: bool = True) -> tuple[torch.Tensor, int]:
    """The reference by hand, on the "leading" respacing t = 0, k, ..., T - k (k = T / STEPS).

    x0 = clip((x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)); eps = (x_t - sqrt(abar_t) x0) /
    sqrt(1 - abar_t); x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, abar_prev = 1 after
    the last step. Returns the sample and how many steps clipped anything.
    """
    abar = torch.cumprod(1 - schedule.betas.float(), dim=0)
    k = T // STEPS
    model = AnalyticNoiseModel()
    clipped_steps = 0
    for t in reversed(range(0, T, k)):
        a_t = abar[t]
        a_prev = abar[t - k] if t - k >= 0 else torch.tensor(1.0)
        eps_hat = model(x, t).sample[:, :1]
        x0 = (x - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        clipped_steps += int((x0.abs() > 1).any())
        if clip:
            x0 = x0.clamp(-1, 1)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x, clipped_steps


def test_ddim_matches_improved_diffusion_where_clipping_triggers():
    schedule = NoiseSchedule.cosine(T)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    ours = solver_sample(AnalyticNoiseModel(), "ddim", schedule, STEPS, generators, SHAPE, torch.device("cpu"))

    start = initial_noise([torch.Generator().manual_seed(s) for s in SEEDS], SHAPE, torch.device("cpu"))
    reference, clipped_steps = improved_diffusion_ddim(schedule, start)
    assert clipped_steps >= STEPS // 2  # the test exercises clipping, not the identity
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)

    # Mixing the clipped x0 with the unclipped eps (diffusers' default) is measurably different.
    unclipped_eps = start.clone()
    abar = torch.cumprod(1 - schedule.betas.float(), dim=0)
    for t in reversed(range(0, T, T // STEPS)):
        a_t, a_prev = abar[t], (abar[t - T // STEPS] if t >= T // STEPS else torch.tensor(1.0))
        eps_hat = AnalyticNoiseModel()(unclipped_eps, t).sample[:, :1]
        x0 = ((unclipped_eps - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()).clamp(-1, 1)
        unclipped_eps = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_hat
    assert (unclipped_eps - reference).abs().max() > 0.05


class RecordingNoiseModel(AnalyticNoiseModel):
    """The analytic model, recording the timesteps the sampler hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        self.seen.append(int(t))
        return super().forward(x, t)


def test_ddim_steps_that_do_not_divide_t_follow_improved_diffusions_ddim_spacing():
    """improved-diffusion's space_timesteps(1000, "ddim30") takes the integer stride k with len(range(0, 1000, k))
    = 30: k = 34 (30 * 34 = 1020 > 1000 > 29 * 34 = 986), so t = 0, 34, ..., 986. diffusers' "leading" spacing
    would take k = 1000 // 30 = 33 (t = 0, ..., 957). The chain steps between consecutive kept timesteps."""
    schedule = NoiseSchedule.cosine(1000)
    model = RecordingNoiseModel()
    generators = [torch.Generator().manual_seed(0)]
    ours = solver_sample(model, "ddim", schedule, 30, generators, SHAPE, torch.device("cpu"))
    assert model.seen == [986 - 34 * i for i in range(30)]

    abar = torch.cumprod(1 - schedule.betas.float(), dim=0)
    x = initial_noise([torch.Generator().manual_seed(0)], SHAPE, torch.device("cpu"))
    for t in reversed(range(0, 1000, 34)):
        a_t = abar[t]
        a_prev = abar[t - 34] if t >= 34 else torch.tensor(1.0)
        eps_hat = AnalyticNoiseModel()(x, t).sample[:, :1]
        x0 = ((x - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()).clamp(-1, 1)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_ddim_refuses_a_step_count_no_integer_stride_gives():
    # ceil(1000 / k) jumps from 334 (k = 3) to 250 (k = 4): 300 steps have no integer stride.
    with pytest.raises(ValueError, match="nearest step counts that have one are 250 or 334"):
        DDIMSampler().resolve_steps(300, 1000)
    assert DDIMSampler().resolve_steps(None, 1000) == 50
