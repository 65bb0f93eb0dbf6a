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


def hand_alpha_bars(num_timesteps: int = T) -> list[float]:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), in Python floats from the paper's cosine betas (eq. 17)."""
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    alpha_bar = [math.cos(((t + 1) / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2 / f0 for t in range(num_timesteps)]
    betas = [min(1 - alpha_bar[0], 0.999)] + [min(1 - alpha_bar[t] / alpha_bar[t - 1], 0.999) for t in range(1, num_timesteps)]
    product, result = 1.0, []
    for beta in betas:
        product *= 1 - beta
        result.append(product)
    return result


def hand_posterior(abar: list[float], t: int, x0: float, xt: float) -> tuple[float, float]:
    """Mean and variance of q(x_{t-1} | x_t, x_0), Ho et al. 2020 eq. 6-7 written out (t >= 1)."""
    beta = 1 - abar[t] / abar[t - 1]
    mean = math.sqrt(abar[t - 1]) * beta / (1 - abar[t]) * x0 + math.sqrt(1 - beta) * (1 - abar[t - 1]) / (1 - abar[t]) * xt
    return mean, (1 - abar[t - 1]) / (1 - abar[t]) * beta


def test_posterior_equals_bayes_rule_on_a_grid_and_the_written_out_formula():
    """q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0): its mean and variance by brute
    force on a grid, against the closed form and tus's q_posterior."""
    schedule = NoiseSchedule.cosine(T)
    abar = hand_alpha_bars()
    x0, xt = 0.4, -0.3
    for t in (1, 20, 500, 990):
        beta = 1 - abar[t] / abar[t - 1]
        x = torch.linspace(-6, 6, 400_001, dtype=torch.float64)
        log_density = -0.5 * (xt - math.sqrt(1 - beta) * x) ** 2 / beta - 0.5 * (x - math.sqrt(abar[t - 1]) * x0) ** 2 / (1 - abar[t - 1])
        weights = torch.exp(log_density - log_density.max())
        weights = weights / torch.trapezoid(weights, x)
        grid_mean = torch.trapezoid(weights * x, x).item()
        grid_variance = torch.trapezoid(weights * (x - grid_mean) ** 2, x).item()
        mean, variance = hand_posterior(abar, t, x0, xt)
        assert grid_mean == pytest.approx(mean, rel=1e-6, abs=1e-9) and grid_variance == pytest.approx(variance, rel=1e-5)
        tus_mean, tus_log_variance = q_posterior(schedule, torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), torch.tensor([t]))
        assert tus_mean.item() == pytest.approx(mean, rel=1e-9, abs=1e-12)
        assert tus_log_variance.item() == pytest.approx(math.log(variance), rel=1e-9)
    # improved-diffusion clips the t = 0 log-variance (beta~_0 = 0) to that of t = 1.
    _, log_variance_0 = q_posterior(schedule, torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64), torch.tensor([0]))
    assert log_variance_0.item() == pytest.approx(math.log(hand_posterior(abar, 1, 0.0, 0.0)[1]), rel=1e-9)


def test_vlb_term_equals_the_kl_written_out_by_hand():
    """L_t (t > 0) in bits per dim: KL between the true posterior and p's Gaussian, whose mean is the posterior mean
    at x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) and whose log-variance is v-interpolated (Nichol &
    Dhariwal eq. 15), averaged over pixels, all computed pixel by pixel in Python floats."""
    schedule = NoiseSchedule.cosine(T)
    abar = hand_alpha_bars()
    x0, noise = toy_batch(batch=3, size=2)
    t = torch.tensor([1, 400, 900])
    xt = q_sample(schedule, x0, t, noise)
    eps_hat = noise + 0.3 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = torch.rand(noise.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    ours = vlb_bits_per_dim(schedule, torch.cat([eps_hat, v], dim=1), x0, xt, t)
    for b, step in enumerate(t.tolist()):
        beta = 1 - abar[step] / abar[step - 1]
        kls = []
        for i in range(2):
            for j in range(2):
                x0_ij, xt_ij = x0[b, 0, i, j].item(), xt[b, 0, i, j].item()
                x0_hat = (xt_ij - math.sqrt(1 - abar[step]) * eps_hat[b, 0, i, j].item()) / math.sqrt(abar[step])
                true_mean, true_variance = hand_posterior(abar, step, x0_ij, xt_ij)
                model_mean, _ = hand_posterior(abar, step, x0_hat, xt_ij)
                frac = (v[b, 0, i, j].item() + 1) / 2
                model_log_variance = frac * math.log(beta) + (1 - frac) * math.log(true_variance)
                model_variance = math.exp(model_log_variance)
                kls.append(0.5 * (math.log(model_variance / true_variance) + (true_variance + (true_mean - model_mean) ** 2) / model_variance - 1))
        assert ours[b].item() == pytest.approx(sum(kls) / len(kls) / math.log(2), rel=1e-7)


def test_vlb_at_t0_is_the_decoder_nll_integrated_by_hand():
    """L_0: minus log of the Gaussian's mass on each pixel's bin [x - 1/255, x + 1/255] (edge bins open), in bits per
    dim; the mass integrated numerically pixel by pixel."""
    schedule = NoiseSchedule.cosine(T)
    abar = hand_alpha_bars()
    x0, noise = toy_batch(batch=2, size=2)
    x0[0, 0, 0, 0], x0[1, 0, 1, 1] = -1.0, 1.0  # one open edge bin each
    t = torch.zeros(2, dtype=torch.long)
    xt = q_sample(schedule, x0, t, noise)
    output = torch.cat([noise * 0.9, torch.full_like(noise, 0.5)], dim=1)
    ours = vlb_bits_per_dim(schedule, output, x0, xt, t)
    beta_0 = 1 - abar[0]
    # At t = 0, p's mean is the posterior mean at x0_hat with abar_{-1} = 1: x0_hat itself; its variance
    # interpolates log beta_0 and the clipped log beta~ (that of t = 1) with frac = (0.5 + 1) / 2.
    log_variance = 0.75 * math.log(beta_0) + 0.25 * math.log(hand_posterior(abar, 1, 0.0, 0.0)[1])
    std = math.exp(0.5 * log_variance)
    for b in range(2):
        nll = []
        for i in range(2):
            for j in range(2):
                x = x0[b, 0, i, j].item()
                mean = (xt[b, 0, i, j].item() - math.sqrt(1 - abar[0]) * 0.9 * noise[b, 0, i, j].item()) / math.sqrt(abar[0])
                lo = -math.inf if x < -0.999 else x - 1 / 255
                hi = math.inf if x > 0.999 else x + 1 / 255
                grid = torch.linspace(max(lo, mean - 12 * std), min(hi, mean + 12 * std), 200_001, dtype=torch.float64)
                mass = torch.trapezoid(gaussian_density(grid, mean, std), grid).item() if grid[-1] > grid[0] else 0.0
                nll.append(-math.log(max(mass, 1e-12)))
        assert ours[b].item() == pytest.approx(sum(nll) / 4 / math.log(2), rel=1e-5)


def test_perfect_model_has_zero_vlb_and_recovers_x0():
    schedule = NoiseSchedule.cosine(T)
    x0, noise = toy_batch(batch=3)
    t = torch.tensor([1, 400, 900])
    xt = q_sample(schedule, x0, t, noise)
    # v = -1 selects beta~_t: with the true noise the model's p equals q(x_{t-1} | x_t, x_0).
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    assert vlb_bits_per_dim(schedule, perfect, x0, xt, t).abs().max().item() < 1e-9
    prediction = p_mean_variance(schedule, perfect, xt, t, clip_denoised=False)
    torch.testing.assert_close(prediction.pred_x0, x0)


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
