"""The improved-DDPM maths: schedule, respacing, KL / decoder NLL, learned variance, hybrid loss."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from tus.losses.gaussian_diffusion import (
    LossAwareTimestepSampler,
    NoiseSchedule,
    UniformTimestepSampler,
    cosine_betas,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    learned_log_variance,
    normal_kl,
    p_mean_variance,
    q_posterior,
    q_sample,
    respace,
    space_timesteps,
    vlb_bits_per_dim,
)

T = 1000


def gaussian_density(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def test_cosine_schedule_matches_the_paper_formula():
    betas = cosine_betas(T)
    schedule = NoiseSchedule(betas)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = torch.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    unclipped = betas < 0.999
    # alpha_bar_t = f(t) / f(0) wherever no earlier beta was clipped (only the very last ones are).
    assert unclipped[:-1].all() and not unclipped[-1]
    torch.testing.assert_close(schedule.alphas_cumprod[:-1], (f / f0)[:-1], rtol=1e-10, atol=1e-12)
    assert betas.max().item() == pytest.approx(0.999)
    assert betas[0].item() == pytest.approx(1 - (math.cos((1 / T + 0.008) / 1.008 * math.pi / 2) ** 2) / f0)
    # Same betas as diffusers' name for this schedule (used by the fast samplers).
    reference = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas.double()
    torch.testing.assert_close(betas, reference, rtol=1e-5, atol=1e-7)


def test_normal_kl_matches_closed_form_and_numerical_integration():
    mean1, std1, mean2, std2 = 0.3, 0.7, -0.4, 1.3
    kl = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (mean1, 2 * math.log(std1), mean2, 2 * math.log(std2))))
    closed = math.log(std2 / std1) + (std1**2 + (mean1 - mean2) ** 2) / (2 * std2**2) - 0.5
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    p, q = gaussian_density(x, mean1, std1), gaussian_density(x, mean2, std2)
    integrated = torch.trapezoid(p * torch.log(p / q), x)
    assert kl.item() == pytest.approx(closed, rel=1e-10)
    assert kl.item() == pytest.approx(integrated.item(), rel=1e-6)
    same = normal_kl(torch.tensor(0.2), torch.tensor(-1.0), torch.tensor(0.2), torch.tensor(-1.0))
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_decoder_nll_integrates_the_gaussian_over_pixel_bins():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    mean, std = torch.tensor(0.1, dtype=torch.float64), 0.05
    log_probabilities = discretized_gaussian_log_likelihood(levels, mean, torch.tensor(math.log(std), dtype=torch.float64))
    # The 256 bins (edge bins extended to +-inf) carry all the mass.
    assert log_probabilities.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    for level in (100, 140, 141):
        lo, hi = levels[level] - 1 / 255, levels[level] + 1 / 255
        x = torch.linspace(lo.item(), hi.item(), 20_001, dtype=torch.float64)
        integrated = torch.trapezoid(gaussian_density(x, mean.item(), std), x)
        assert log_probabilities[level].exp().item() == pytest.approx(integrated.item(), rel=1e-7)
    # Lowest bin = P(X < -1 + 1/255), computed from the other side for a mean near it.
    edge = discretized_gaussian_log_likelihood(levels[:1], torch.tensor(-1.0, dtype=torch.float64), torch.tensor(math.log(0.01), dtype=torch.float64))
    expected = 0.5 * (1 + math.erf((1 / 255) / 0.01 / math.sqrt(2)))
    assert edge.exp().item() == pytest.approx(expected, rel=1e-9)


def test_learned_variance_stays_between_beta_and_posterior_variance():
    schedule = NoiseSchedule.cosine(T)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    low = torch.minimum(schedule.posterior_log_variance_clipped[t], schedule.log_betas[t])
    high = torch.maximum(schedule.posterior_log_variance_clipped[t], schedule.log_betas[t])
    for v_value in torch.linspace(-1, 1, 11, dtype=torch.float64):
        log_variance = learned_log_variance(schedule, torch.full((len(t), 1, 2, 2), v_value.item(), dtype=torch.float64), t)
        flat = log_variance[:, 0, 0, 0]
        assert ((flat >= low - 1e-12) & (flat <= high + 1e-12)).all()
    ends = learned_log_variance(schedule, torch.tensor([-1.0, 1.0], dtype=torch.float64).reshape(2, 1, 1, 1), torch.tensor([10, 10]))
    assert ends[0].item() == pytest.approx(math.log(schedule.posterior_variance[10].item()))
    assert ends[1].item() == pytest.approx(math.log(schedule.betas[10].item()))


def test_respacing_with_all_steps_is_the_identity():
    schedule = NoiseSchedule.cosine(T)
    assert space_timesteps(T, T) == list(range(T))
    full = respace(schedule, range(T))
    torch.testing.assert_close(full.betas, schedule.betas, rtol=1e-12, atol=1e-15)
    assert torch.equal(full.model_timesteps, torch.arange(T))


def test_respaced_schedule_keeps_the_marginals_at_kept_steps():
    schedule = NoiseSchedule.cosine(T)
    keep = space_timesteps(T, 100)
    assert len(keep) == 100 and keep[0] == 0 and keep[-1] == T - 1
    spaced = respace(schedule, keep)
    torch.testing.assert_close(spaced.alphas_cumprod, schedule.alphas_cumprod[keep], rtol=1e-12, atol=1e-15)
    assert spaced.model_timesteps.tolist() == keep
    # improved-diffusion's docstring example: 300 steps in sections of 10, 15 and 20.
    sections = space_timesteps(300, [10, 15, 20])
    assert len(sections) == 45
    assert [sum(lo <= s < lo + 100 for s in sections) for lo in (0, 100, 200)] == [10, 15, 20]
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, 11)


def toy_batch(batch: int = 4, size: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x0 = (torch.randint(0, 256, (batch, 1, size, size), generator=generator).double() / 127.5) - 1
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    return x0, noise


def test_vlb_term_trains_only_the_variance():
    schedule = NoiseSchedule.cosine(T)
    x0, noise = toy_batch()
    t = torch.tensor([0, 1, 300, 999])
    xt = q_sample(schedule, x0, t, noise)
    output = torch.randn(4, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    terms = hybrid_loss(schedule, output, x0, xt, t, noise)
    (vlb_grad,) = torch.autograd.grad(terms.vlb.sum(), output, retain_graph=True)
    assert torch.count_nonzero(vlb_grad[:, :1]) == 0
    assert torch.count_nonzero(vlb_grad[:, 1:]) == vlb_grad[:, 1:].numel()
    (mse_grad,) = torch.autograd.grad(terms.mse.sum(), output)
    assert torch.count_nonzero(mse_grad[:, 1:]) == 0
    # lambda * T = 0.001 * 1000: the per-t VLB term enters with weight 1.
    torch.testing.assert_close(terms.loss, terms.mse + terms.vlb)


def test_vlb_is_zero_for_the_true_noise_and_posterior_variance():
    schedule = NoiseSchedule.cosine(T)
    x0, noise = toy_batch(batch=3)
    t = torch.tensor([1, 400, 900])
    xt = q_sample(schedule, x0, t, noise)
    # v = -1 selects beta~_t: with the true noise the model's p equals q(x_{t-1} | x_t, x_0).
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    assert vlb_bits_per_dim(schedule, perfect, x0, xt, t).abs().max().item() < 1e-9
    prediction = p_mean_variance(schedule, perfect, xt, t, clip_denoised=False)
    posterior_mean, _ = q_posterior(schedule, x0, xt, t)
    torch.testing.assert_close(prediction.mean, posterior_mean)
    torch.testing.assert_close(prediction.pred_x0, x0)


def test_vlb_at_t0_is_the_decoder_nll_in_bits():
    schedule = NoiseSchedule.cosine(T)
    x0, noise = toy_batch(batch=2)
    t = torch.zeros(2, dtype=torch.long)
    xt = q_sample(schedule, x0, t, noise)
    output = torch.cat([noise * 0.9, torch.zeros_like(noise)], dim=1)
    prediction = p_mean_variance(schedule, output, xt, t, clip_denoised=False)
    nll = -discretized_gaussian_log_likelihood(x0, prediction.mean, 0.5 * prediction.log_variance)
    expected = nll.flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(vlb_bits_per_dim(schedule, output, x0, xt, t), expected)


def test_loss_aware_sampler_is_uniform_until_warm_then_follows_the_losses():
    sampler = LossAwareTimestepSampler(num_timesteps=4, history=2, uniform_share=0.0)
    torch.testing.assert_close(sampler.probabilities(), UniformTimestepSampler(4).probabilities())
    sampler.update(torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0]))
    assert not sampler.warmed_up()
    sampler.update(torch.tensor([3]), torch.tensor([4.0]))
    assert sampler.warmed_up()
    torch.testing.assert_close(sampler.probabilities(), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    # The oldest value is dropped: t = 0 now has history (1, 9) -> sqrt(mean(L^2)) = sqrt(41).
    sampler.update(torch.tensor([0]), torch.tensor([9.0]))
    weights = torch.tensor([math.sqrt(41), 2, 3, 4], dtype=torch.float64)
    torch.testing.assert_close(sampler.probabilities(), weights / weights.sum())
    t, importance = sampler.sample(10_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(importance, (1 / (4 * sampler.probabilities()[t])).float())
    counts = torch.bincount(t, minlength=4) / 10_000
    torch.testing.assert_close(counts.double(), sampler.probabilities(), atol=0.02, rtol=0)
    restored = LossAwareTimestepSampler(num_timesteps=4, history=2, uniform_share=0.0)
    restored.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(restored.probabilities(), sampler.probabilities())
