"""Generic speed callbacks that leave a method's results unchanged.

:class:`ChannelsLast` runs a convolutional LightningModule in the channels_last (NHWC) memory
format: the weights once at setup, every 4-D image tensor of each batch as it arrives on the
device. Convolutions then pick cuDNN's / oneDNN's NHWC kernels (1.5x for fp32 ResNet-18
training on a 2-core AMD EPYC, more with bf16 on tensor cores; see :mod:`tus.hardware`),
while outputs equal the NCHW run's up to floating-point reassociation.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from tus.hardware import batch_to_channels_last, prefers_channels_last, to_channels_last


def batch_images_to_channels_last(batch: Any) -> Any:
    """Convert every 4-D float tensor in ``batch`` (dict values, list/tuple elements) in place.

    Dicts and lists are updated in place so the batch object Lightning passes on to the step
    sees the converted tensors; a bare tensor or tuple is returned converted.
    """
    if isinstance(batch, torch.Tensor):
        return batch_to_channels_last(batch) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        for key, value in batch.items():
            batch[key] = batch_images_to_channels_last(value)
        return batch
    if isinstance(batch, list):
        batch[:] = [batch_images_to_channels_last(value) for value in batch]
        return batch
    if isinstance(batch, tuple):
        return type(batch)(batch_images_to_channels_last(value) for value in batch)
    return batch


class ChannelsLast(Callback):
    """Run the module and its image batches in channels_last.

    ``enabled``: True converts whenever the module has spatial convolutions; ``'auto'``
    only where :func:`tus.hardware.prefers_channels_last` says it is faster on the module's
    device; False does nothing. A module without spatial convolutions (a ViT) is never
    converted. :attr:`active` records the decision made at fit/validate/test/predict start.
    Exports stay loadable into NCHW models: tus's savers store ``.contiguous()`` tensors.
    """

    def __init__(self, enabled: bool | Literal["auto"] = "auto"):
        if enabled not in (True, False, "auto"):
            raise ValueError(f"ChannelsLast(enabled=...) takes True, False or 'auto', got {enabled!r}")
        self.enabled = enabled
        self.active = False

    def _decide(self, pl_module: L.LightningModule) -> bool:
        if self.enabled is False:
            return False
        if self.enabled == "auto":
            return prefers_channels_last(pl_module, pl_module.device.type)
        return prefers_channels_last(pl_module, "cpu")  # i.e. "has spatial convolutions"

    # The *_start hooks run after the strategy moved the module to its device (which 'auto'
    # asks about) and wrapped it; the conversion keeps parameter identity, so optimisers and
    # DDP buckets made before still hold the same parameters.
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def _start(self, pl_module: L.LightningModule) -> None:
        self.active = self._decide(pl_module)
        if self.active:
            to_channels_last(pl_module)

    def _convert(self, batch: Any) -> None:
        if self.active:
            batch_images_to_channels_last(batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._convert(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._convert(batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._convert(batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._convert(batch)


class CompileModel(Callback):
    """``trainer.compile: true``: torch.compile each direct child module of the LightningModule
    (in place, ``nn.Module.compile``), so training_step and the loss code stay eager and the
    checkpoint keys stay unchanged. Off by default: on 2-core CPUs compilation costs more than
    the steps it speeds up (see benchmarks/finetune_throughput.py --compile)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for child in pl_module.children():
            child.compile()
