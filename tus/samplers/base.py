"""What a sampler is: a name, its default number of steps, and ``sample`` from x_T ~ N(0, I)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from diffusers import UNet2DModel

from tus.losses.gaussian_diffusion import NoiseSchedule


class Sampler:
    """A way to draw images from a trained diffusion model over its noise schedule.

    Subclasses set ``default_steps`` (None: all of the schedule's steps, and no other count)
    and implement :meth:`sample`. One instance per call; it holds no state between calls.
    """

    name: ClassVar[str]
    default_steps: ClassVar[int | None] = None

    def resolve_steps(self, steps: int | None, num_timesteps: int) -> int:
        """The number of model evaluations: the default, or ``steps`` checked against the schedule."""
        if self.default_steps is None:
            if steps not in (None, num_timesteps):
                raise ValueError(f"the {self.name} sampler runs all {num_timesteps} steps, not {steps}; the respaced sampler takes fewer")
            return num_timesteps
        steps = self.default_steps if steps is None else steps
        if not 1 <= steps <= num_timesteps:
            raise ValueError(f"{self.name} steps must be in [1, {num_timesteps}], got {steps}")
        return steps

    def sample(self, unet: UNet2DModel, schedule: NoiseSchedule, steps: int, generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Images in about [-1, 1], shape (len(generators), *shape); image i uses only generators[i]."""
        raise NotImplementedError


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One standard-normal draw per image, each from its own (CPU) generator."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (B, 1, H, W) -> uint8 (B, H, W), rounding to the nearest level."""
    return ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
