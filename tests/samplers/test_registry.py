"""The sampler registry: built-in samplers by name, a user's sampler by class path through
``sample_images`` and the training-time grid config, unknown names refused."""

from __future__ import annotations

import pytest
import torch

from tus.callbacks.diffusion import SampleGridConfig
from tus.config import ConfigError, build_config
from tus.losses.gaussian_diffusion import NoiseSchedule
from tus.samplers import SAMPLERS, get_sampler, resolve_steps, sample_images
from tus.samplers.ancestral import RespacedSampler
from tus.samplers.base import Sampler, initial_noise


class NoiseOnlySampler(Sampler):
    """A sampler no tus file knows: returns the initial noise scaled by 1/steps."""

    name = "noise_only"
    default_steps = 4

    def sample(self, unet, schedule, steps, generators, shape, device):
        return initial_noise(generators, shape, device) / steps


class TinyUNet(torch.nn.Module):
    config = type("Config", (), {"in_channels": 1, "sample_size": 8})()


def test_names_resolve_and_default_steps_apply():
    assert set(SAMPLERS) == {"ddpm", "respaced", "ddim", "dpm"}
    assert isinstance(get_sampler("respaced"), RespacedSampler)
    assert resolve_steps("ddpm", None, 100) == 100 and resolve_steps("dpm", None, 100) == 20
    with pytest.raises(ValueError, match="runs all 100 steps"):
        resolve_steps("ddpm", 10, 100)
    with pytest.raises(ConfigError, match="unknown sampler 'euler'"):
        get_sampler("euler")
    with pytest.raises(ConfigError, match="not a tus.samplers.base.Sampler"):
        get_sampler("torch.nn.Linear")


def test_a_users_sampler_plugs_in_by_class_path():
    path = f"{__name__}.NoiseOnlySampler"
    schedule = NoiseSchedule.cosine(10)
    images = sample_images(TinyUNet(), schedule, path, None, seeds=[3, 4])
    expected = torch.stack([torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (3, 4)]) / 4
    torch.testing.assert_close(images, expected.clamp(-1, 1))
    assert build_config(SampleGridConfig, {"sampler": path}).sampler == path
