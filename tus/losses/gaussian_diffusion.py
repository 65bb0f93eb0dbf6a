"""Gaussian diffusion maths of improved DDPM (Nichol & Dhariwal 2021), kept apart from the model.

- :class:`NoiseSchedule`: betas and every quantity derived from them (float64), optionally a
  respaced subset of the training timesteps (``model_timesteps`` maps each step back to the
  training timestep the U-Net was conditioned on).
- :func:`cosine_betas` (paper eq. 17, betas clipped at 0.999), :func:`space_timesteps` and
  :func:`respace` (improved-diffusion's strided sampling schedules).
- The reverse process with learned variance: :func:`learned_log_variance` interpolates
  log beta_t and log beta~_t (paper eq. 15), :func:`p_mean_variance` gives the model's mean,
  log-variance and x0 estimate.
- The hybrid objective: :func:`hybrid_loss` = L_simple + lambda * L_vlb (paper Sec. 3.1), where
  the VLB term sees the predicted noise through a stop-gradient so it trains only the variance.
  VLB terms are in bits per dimension: :func:`normal_kl` for t > 0 and
  :func:`discretized_gaussian_log_likelihood` (the decoder) for t = 0.
- :class:`LossAwareTimestepSampler`: importance sampling of t from the history of L_vlb per t
  (paper Sec. 3.3), and :class:`UniformTimestepSampler`.

Model outputs follow improved-diffusion's layout: channels ``[:C]`` are the predicted noise,
channels ``[C:]`` the variance interpolation v in [-1, 1] (mapped to [0, 1] by (v + 1) / 2).
Images are in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Max beta of the cosine schedule: larger betas near t = T make sampling singular (paper Sec. 3.2).
MAX_BETA = 0.999
# Offset s of the cosine schedule, so beta_0 is not vanishingly small (paper Sec. 3.2).
COSINE_OFFSET = 0.008
# 8-bit data scaled to [-1, 1]: each of the 256 levels is a bin of width 2 / 255.
PIXEL_BIN_HALF_WIDTH = 1.0 / 255.0


def cosine_alpha_bar(fraction: torch.Tensor, offset: float = COSINE_OFFSET) -> torch.Tensor:
    """alpha_bar(t) = f(t) / f(0) with f(t) = cos^2(pi / 2 * (t / T + s) / (1 + s)); ``fraction`` = t / T."""
    fraction = torch.as_tensor(fraction, dtype=torch.float64)

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

    return f(fraction) / f(torch.zeros((), dtype=torch.float64))


def cosine_betas(num_timesteps: int, max_beta: float = MAX_BETA, offset: float = COSINE_OFFSET) -> torch.Tensor:
    """beta_t = min(1 - alpha_bar(t) / alpha_bar(t - 1), max_beta) for t = 1..T (index 0..T-1)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = cosine_alpha_bar(steps, offset)
    return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=max_beta)


class NoiseSchedule:
    """A variance schedule and its derived terms, all float64 tensors of shape (T,).

    Index i is the i-th step of *this* schedule; ``model_timesteps[i]`` is the training
    timestep fed to the U-Net at that step (the identity unless the schedule was respaced).
    """

    def __init__(self, betas: torch.Tensor, model_timesteps: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.model_timesteps = torch.arange(self.num_timesteps) if model_timesteps is None else torch.as_tensor(model_timesteps, dtype=torch.long)
        if self.model_timesteps.shape != betas.shape:
            raise ValueError("model_timesteps must have one entry per beta")
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        # beta~_t, the variance of q(x_{t-1} | x_t, x_0) (paper eq. 10).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0; its log is replaced by log beta~_1, as improved-diffusion does.
        self.posterior_log_variance_clipped = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.log_betas = torch.log(betas)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000) -> NoiseSchedule:
        return cls(cosine_betas(num_timesteps))


def extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped (B, 1, 1, ...) to broadcast over ``like``, in ``like``'s dtype/device."""
    picked = values.to(t.device)[t].to(like.dtype)
    return picked.reshape(-1, *([1] * (like.ndim - 1)))


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The training timesteps to keep for a respaced sampler (improved-diffusion's rule).

    ``section_counts`` is either a number of steps ``K`` (one section, evenly strided over
    0..T-1, both ends included), a list of per-section counts (the T steps are cut into equal
    sections and each is strided on its own), a comma-separated string of those, or
    ``"ddimK"`` (stride T // K from 0, as the DDIM paper).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride over {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot divide a section of {size} steps into {count} steps")
        frac_stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += frac_stride
        start += size
    return sorted(set(kept))


def respace(schedule: NoiseSchedule, keep: Sequence[int]) -> NoiseSchedule:
    """The schedule visiting only the training timesteps ``keep``, with betas recomputed.

    beta'_i = 1 - alpha_bar[keep_i] / alpha_bar[keep_{i-1}], so the respaced chain has the
    same marginals q(x_t | x_0) at the kept timesteps (improved-diffusion's SpacedDiffusion).
    """
    keep = sorted(set(int(k) for k in keep))
    if not keep or keep[0] < 0 or keep[-1] >= schedule.num_timesteps:
        raise ValueError(f"timesteps to keep must lie in [0, {schedule.num_timesteps - 1}]")
    alpha_bar = schedule.alphas_cumprod[keep]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return NoiseSchedule(1.0 - alpha_bar / previous, model_timesteps=schedule.model_timesteps[keep])


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (paper eq. 9)."""
    return extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (clipped) log-variance of q(x_{t-1} | x_t, x_0) (paper eqs. 10-12)."""
    mean = extract(schedule.posterior_mean_coef1, t, xt) * x0 + extract(schedule.posterior_mean_coef2, t, xt) * xt
    return mean, extract(schedule.posterior_log_variance_clipped, t, xt).expand_as(xt)


def predict_x0_from_noise(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return extract(schedule.sqrt_recip_alphas_cumprod, t, xt) * xt - extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt) * noise


def learned_log_variance(schedule: NoiseSchedule, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log Sigma = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2 (paper eq. 15)."""
    fraction = (v + 1) / 2
    return fraction * extract(schedule.log_betas, t, v) + (1 - fraction) * extract(schedule.posterior_log_variance_clipped, t, v)


@dataclass
class ModelPrediction:
    mean: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    pred_noise: torch.Tensor


def split_output(model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted noise, variance interpolation v): the two halves of the output channels."""
    channels = model_output.shape[1]
    if channels % 2:
        raise ValueError(f"a learned-variance model outputs 2C channels, got {channels}")
    return model_output[:, : channels // 2], model_output[:, channels // 2 :]


def p_mean_variance(schedule: NoiseSchedule, model_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool) -> ModelPrediction:
    """Mean and log-variance of p(x_{t-1} | x_t) from an (noise, v) model output.

    The mean is the posterior mean at the predicted x0 (paper eq. 11-13); clipping x0 to
    [-1, 1] is for sampling only (training keeps the exact VLB).
    """
    pred_noise, v = split_output(model_output)
    log_variance = learned_log_variance(schedule, v, t)
    pred_x0 = predict_x0_from_noise(schedule, xt, t, pred_noise)
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1, 1)
    mean, _ = q_posterior(schedule, pred_x0, xt, t)
    return ModelPrediction(mean=mean, log_variance=log_variance, pred_x0=pred_x0, pred_noise=pred_noise)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit data ``x`` in [-1, 1] under a discretised Gaussian.

    Each value owns the bin [x - 1/255, x + 1/255]; the lowest bin extends to -inf and the
    highest to +inf so the 256 bins carry all the mass (Ho et al. 2020, eq. 13). The exact
    normal CDF is used (improved-diffusion uses a tanh approximation).
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv_std * (centered + PIXEL_BIN_HALF_WIDTH))
    cdf_min = standard_normal_cdf(inv_std * (centered - PIXEL_BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def vlb_bits_per_dim(schedule: NoiseSchedule, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-example VLB term L_t in bits per dimension (paper eqs. 4-6).

    t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); t = 0: the decoder's negative
    log-likelihood of x0.
    """
    true_mean, true_log_variance = q_posterior(schedule, x0, xt, t)
    prediction = p_mean_variance(schedule, model_output, xt, t, clip_denoised=False)
    kl = mean_over_pixels(normal_kl(true_mean, true_log_variance, prediction.mean, prediction.log_variance)) / math.log(2.0)
    decoder_nll = -mean_over_pixels(discretized_gaussian_log_likelihood(x0, prediction.mean, 0.5 * prediction.log_variance)) / math.log(2.0)
    return torch.where(t == 0, decoder_nll, kl)


@dataclass
class HybridLoss:
    """Per-example terms: ``loss`` = ``mse`` + vlb_weight * T * ``vlb``."""

    loss: torch.Tensor
    mse: torch.Tensor
    vlb: torch.Tensor


def hybrid_loss(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    vlb_weight: float = 0.001,
) -> HybridLoss:
    """L_hybrid = L_simple + lambda L_vlb (paper eq. 16), one sampled t per example.

    L_vlb = sum_t L_t is estimated by T * L_t with t uniform, so with lambda = 0.001 and
    T = 1000 the VLB term enters with weight 1, as in improved-diffusion. The predicted noise
    is detached inside the VLB term: L_vlb trains only the variance, L_simple only the mean.
    """
    pred_noise, v = split_output(model_output)
    mse = mean_over_pixels((noise - pred_noise) ** 2)
    frozen_mean_output = torch.cat([pred_noise.detach(), v], dim=1)
    vlb = vlb_bits_per_dim(schedule, frozen_mean_output, x0, xt, t)
    return HybridLoss(loss=mse + vlb_weight * schedule.num_timesteps * vlb, mse=mse, vlb=vlb)


class UniformTimestepSampler:
    """t ~ U{0..T-1}; importance weights are all 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=generator.device)
        return t, torch.ones(batch_size, device=generator.device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


class LossAwareTimestepSampler(UniformTimestepSampler):
    """Importance sampling p_t proportional to sqrt(E[L_t^2]) over the last ``history`` L_vlb values per t.

    Until every t has ``history`` values, t is uniform (paper Sec. 3.3). A small uniform
    share keeps every t reachable. Weights 1 / (T p_t) keep the objective's expectation
    that of uniform t. The history is NumPy, not torch: spawned worker processes would
    otherwise share (and all write) one tensor.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_share: float = 0.001):
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_share = uniform_share
        self.loss_history = np.zeros((num_timesteps, history))
        self.counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().probabilities()
        weights = torch.from_numpy(np.sqrt((self.loss_history**2).mean(axis=1)))
        weights = weights / weights.sum()
        return weights * (1 - self.uniform_share) + self.uniform_share / self.num_timesteps

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = self.probabilities().to(generator.device)
        t = torch.multinomial(probabilities, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * probabilities[t])
        return t, weights.float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record L_vlb values (from all ranks, so every rank keeps the same history)."""
        for step, loss in zip(t.detach().cpu().tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[step] == self.history:
                self.loss_history[step] = np.roll(self.loss_history[step], -1)
                self.loss_history[step, -1] = loss
            else:
                self.loss_history[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict:
        return {"loss_history": torch.from_numpy(self.loss_history.copy()), "counts": torch.from_numpy(self.counts.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.loss_history = state["loss_history"].double().numpy().copy()
        self.counts = state["counts"].long().numpy().copy()


def timestep_sampler(kind: str, num_timesteps: int) -> UniformTimestepSampler:
    if kind == "uniform":
        return UniformTimestepSampler(num_timesteps)
    if kind == "loss_aware":
        return LossAwareTimestepSampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler '{kind}' (choose 'uniform' or 'loss_aware')")
