"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the U-Net call every sampler makes.

A sampler calls ``model(x, t).sample`` and reads ``model.config``; :class:`GuidedUNet` answers the same
call for a class-conditional U-Net (:class:`tus.methods.iddpm.UNetConfig` ``num_classes``), so no
sampler knows about labels. Its noise half is

    eps = (1 + w) * eps(x, y) - w * eps(x, null)

and its variance half (the learned interpolation v) is the conditional branch's. ``w = 0`` is plain
conditional sampling (one model call); ``w > 0`` evaluates both branches in one batch of 2B.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput


class GuidedUNet(torch.nn.Module):
    """``unet`` with per-image class labels fixed (None: every image unconditional) and guidance scale ``w``."""

    def __init__(self, unet: UNet2DModel, labels: Sequence[int] | torch.Tensor | None, guidance: float = 0.0):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        rows = getattr(unet.config, "num_class_embeds", None)
        self.null = None if rows is None else int(rows) - 1
        if labels is not None and self.null is None:
            raise ValueError("labels were given for an unconditional U-Net (it was trained without unet.num_classes)")
        if guidance < 0:
            raise ValueError(f"the guidance scale must be >= 0, got {guidance}")
        if guidance and labels is None:
            raise ValueError("guidance needs labels to guide towards")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            bad = (labels < 0) | (labels >= self.null)
            if bool(bad.any()):
                raise ValueError(f"label {int(labels[bad][0])} is outside 0..{self.null - 1}: the model knows {self.null} classes")
        self.labels = labels
        self.guidance = float(guidance)

    def _labels(self, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.null is None:
            return None
        if self.labels is None:
            return torch.full((batch,), self.null, dtype=torch.long, device=device)
        if self.labels.shape[0] != batch:
            raise ValueError(f"{self.labels.shape[0]} labels for a batch of {batch} images")
        return self.labels.to(device)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> UNet2DOutput:
        labels = self._labels(x.shape[0], x.device)
        if labels is None:  # an unconditional model (or a stub) is called as before
            return UNet2DOutput(sample=self.unet(x, t).sample)
        if not self.guidance:
            return UNet2DOutput(sample=self.unet(x, t, class_labels=labels).sample)
        both_t = torch.cat([t, t]) if t.dim() else t
        output = self.unet(torch.cat([x, x]), both_t, class_labels=torch.cat([labels, torch.full_like(labels, self.null)])).sample
        conditional, unconditional = output.chunk(2)
        return UNet2DOutput(sample=guided_output(conditional, unconditional, self.guidance))


def guided_output(conditional: torch.Tensor, unconditional: torch.Tensor, guidance: float) -> torch.Tensor:
    """The guided (B, 2C, H, W) output: noise channels (1 + w) eps_c - w eps_u, variance channels the conditional's."""
    channels = conditional.shape[1] // 2
    eps = (1 + guidance) * conditional[:, :channels] - guidance * unconditional[:, :channels]
    return torch.cat([eps, conditional[:, channels:]], dim=1)
