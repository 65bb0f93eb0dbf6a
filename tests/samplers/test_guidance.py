"""Classifier-free guidance around the U-Net call of every sampler, checked on stub models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tus.losses.gaussian_diffusion import NoiseSchedule
from tus.samplers import SAMPLERS, sample_images
from tus.samplers.guidance import GuidedUNet

STEPS = 50
BASE = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
# Per-class data (rows 0, 1) and the "no label" row 2: the oracle's x0 for each class index.
TARGETS = torch.stack([0.3 * BASE[0], -0.2 * BASE[0], 0.1 * BASE[0]])
RUNS = {"ddpm": None, "respaced": 7, "ddim": 5, "dpm": 5}


class ClassOracle(torch.nn.Module):
    """The exact model for data that is always TARGETS[y]: noise = (x - sqrt(ab) T_y) / sqrt(1 - ab), v = 0.1 y - 1."""

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        self.alphas_cumprod = schedule.alphas_cumprod.float()
        self.config = SimpleNamespace(in_channels=1, sample_size=4, num_class_embeds=3)

    def forward(self, x, t, class_labels):
        alpha_bar = self.alphas_cumprod[torch.as_tensor(t).reshape(-1).expand(x.shape[0])].reshape(-1, 1, 1, 1)
        noise = (x - alpha_bar.sqrt() * TARGETS[class_labels]) / (1 - alpha_bar).sqrt()
        v = (0.1 * class_labels.float() - 1).reshape(-1, 1, 1, 1).expand_as(noise)
        return SimpleNamespace(sample=torch.cat([noise, v], dim=1))


def test_guided_output_is_the_cfg_combination_by_hand():
    oracle = ClassOracle(NoiseSchedule.cosine(STEPS))
    x, t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 30])
    labels = torch.tensor([0, 1])
    conditional = oracle(x, t, labels).sample
    unconditional = oracle(x, t, torch.tensor([2, 2])).sample
    w = 2.0
    guided = GuidedUNet(oracle, [0, 1], w)(x, t).sample
    # eps = (1 + w) eps(x, y) - w eps(x, null) = 3 eps_c - 2 eps_u; the variance channel is the conditional one.
    torch.testing.assert_close(guided[:, :1], 3 * conditional[:, :1] - 2 * unconditional[:, :1])
    torch.testing.assert_close(guided[:, 1:], conditional[:, 1:])
    torch.testing.assert_close(GuidedUNet(oracle, [0, 1], 0.0)(x, t).sample, conditional)
    torch.testing.assert_close(GuidedUNet(oracle, None)(x, t).sample, unconditional)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_draws_the_conditioned_class_and_guides_it(sampler):
    assert set(RUNS) == set(SAMPLERS)  # a new sampler joins this test
    schedule = NoiseSchedule.cosine(STEPS)
    oracle = ClassOracle(schedule)
    steps = RUNS[sampler]
    # w = 0 is conditional sampling: the exact model of class y returns class y's data.
    images = sample_images(oracle, schedule, sampler, steps, [1, 2, 3], labels=[0, 1, 0], guidance=0.0)
    torch.testing.assert_close(images, TARGETS[[0, 1, 0]], atol=1e-4, rtol=0)
    # Without labels: the "no label" data.
    torch.testing.assert_close(sample_images(oracle, schedule, sampler, steps, [1, 2]), TARGETS[[2, 2]], atol=1e-4, rtol=0)
    # Guided noise of exact models is the exact noise of (1 + w) T_y - w T_null (linear in the data).
    guided = sample_images(oracle, schedule, sampler, steps, [1, 2], labels=[0, 1], guidance=2.0)
    torch.testing.assert_close(guided, 3 * TARGETS[[0, 1]] - 2 * TARGETS[[2, 2]], atol=1e-4, rtol=0)


def test_labels_are_checked():
    oracle = ClassOracle(NoiseSchedule.cosine(STEPS))
    with pytest.raises(ValueError, match="label 2 is outside 0..1"):
        GuidedUNet(oracle, [0, 2])
    with pytest.raises(ValueError, match="guidance needs labels"):
        GuidedUNet(oracle, None, 1.0)
    unconditional = SimpleNamespace(config=SimpleNamespace(in_channels=1, sample_size=4))
    with pytest.raises(ValueError, match="unconditional U-Net"):
        GuidedUNet(unconditional, [0])  # type: ignore[arg-type]
