"""Generic speed callbacks that leave a method's results unchanged.

:class:`ChannelsLast` runs a convolutional LightningModule in the channels_last (NHWC) memory
format: the weights once at setup, every 4-D image tensor of each batch as it arrives on the
device. Convolutions then pick cuDNN's / oneDNN's NHWC kernels, while outputs equal the NCHW
run's up to floating-point reassociation. Whether that is faster depends on the network, the
batch and the device: on an H200 in bf16, ResNet-18 fine-tuning ran 1.45x faster in
channels_last but the diffusion U-Net (GroupNorm, attention) 0.74x; on a 2-core AMD EPYC, fp32
ResNet-18 training 1.1x faster at 128 px, 0.89x at 64 px with batch 16. So on one CPU or one
GPU ``'auto'`` times both formats on the first training batch (:func:`time_training_step`: several steps after
a warm-up, the formats alternating; a fit shorter than that trial stays NCHW untimed) and
switches to channels_last only when it is faster by ``TRIAL_MARGIN``; the choice is stored per
machine and setting (:class:`MemoryFormatChoices`, keyed by everything the timing depends on)
and in the checkpoint, so later runs and resumed runs reuse it instead of timing again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from tus.config import write_text_atomic
from tus.data.cache import cache_root
from tus.hardware import batch_to_channels_last, cpu_model, prefers_channels_last, to_channels_last

# Per memory format and round: untimed, then timed, trial steps; the fastest timed one counts.
# The formats alternate for TRIAL_ROUNDS rounds, so neither gets all of a drifting machine's
# slow moments (with one round the 64 px ResNet-18 verdict flipped between runs).
TRIAL_WARMUP_STEPS = 1
TRIAL_TIMED_STEPS = 3
TRIAL_ROUNDS = 2
# channels_last must beat NCHW by this fraction to be chosen: NCHW is the default layout and the
# safe one, and a smaller difference is within what a loaded machine's timing can invert (a cache
# once held 3.16 s vs 3.18 s for a step whose steady cost is 0.25 s).
TRIAL_MARGIN = 0.10
# The training steps one measurement costs. A fit with fewer optimiser steps (a smoke test, a
# 1-step CV) trains in NCHW untimed: the trial would cost more than the fit it is for. Nothing is
# stored for it, so the machine's first longer fit measures; the choice still goes into the
# fit's checkpoint, so a resumed fit keeps the format it started in.
TRIAL_STEPS = TRIAL_ROUNDS * 2 * (TRIAL_WARMUP_STEPS + TRIAL_TIMED_STEPS)
# Part of every stored choice's key: choices measured by another protocol are measured again.
TRIAL_PROTOCOL = f"{TRIAL_ROUNDS} rounds x ({TRIAL_WARMUP_STEPS} warm-up + {TRIAL_TIMED_STEPS} timed steps), margin {TRIAL_MARGIN:.0%}"


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


def image_shapes(batch: Any) -> list[tuple[int, ...]]:
    """The shapes of the 4-D float tensors in ``batch``, in traversal order."""
    if isinstance(batch, torch.Tensor):
        return [tuple(batch.shape)] if batch.dim() == 4 and batch.is_floating_point() else []
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    return [shape for value in values for shape in image_shapes(value)]


def _copy_containers(batch: Any) -> Any:
    """``batch`` with new dicts/lists/tuples around the same tensors (so converting it leaves the original alone)."""
    if isinstance(batch, dict):
        return {key: _copy_containers(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_copy_containers(value) for value in batch)
    return batch


def _log_nothing(*args: Any, **kwargs: Any) -> None:
    """Stands in for LightningModule.log/log_dict during trial steps."""


@contextlib.contextmanager
def rewound(pl_module: L.LightningModule) -> Iterator[None]:
    """Run trial steps that leave no trace: buffers (BatchNorm statistics), the torch random
    streams and gradients are restored afterwards, and ``log``/``log_dict`` do nothing meanwhile.

    State a method keeps outside its buffers (e.g. the loss-aware timestep sampler of
    :class:`tus.methods.iddpm.IDDPMModule`) goes out and back in through the module's own
    ``on_save_checkpoint``/``on_load_checkpoint``, the hooks exact resume already relies on.
    """
    buffers = [buffer.detach().clone() for buffer in pl_module.buffers()]
    extra: dict[str, Any] = {}
    pl_module.on_save_checkpoint(extra)
    extra = copy.deepcopy(extra)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    pl_module.log = pl_module.log_dict = _log_nothing  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
        with torch.no_grad():
            for buffer, saved in zip(pl_module.buffers(), buffers):
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        pl_module.zero_grad(set_to_none=True)
        pl_module.on_load_checkpoint(extra)


def time_training_step(trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, channels_last: bool) -> float | None:
    """Seconds of one training step (forward, loss, backward; no optimiser step) on ``batch``
    with the module and batch in channels_last or NCHW; the fastest of the timed trials.

    Runs under :func:`rewound`, so the run goes on as if the trials never happened, except for
    the module's memory format, which is left as asked. None when the step returns no loss.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    pl_module.to(memory_format=memory_format)
    trial = _copy_containers(batch)
    if channels_last:
        trial = batch_images_to_channels_last(trial)
    synchronize = torch.cuda.synchronize if pl_module.device.type == "cuda" else (lambda: None)
    seconds = []
    with rewound(pl_module):
        for _ in range(TRIAL_WARMUP_STEPS + TRIAL_TIMED_STEPS):
            synchronize()
            start = time.perf_counter()
            with trainer.precision_plugin.train_step_context():
                output = pl_module.training_step(trial, 0)
            loss = output.get("loss") if isinstance(output, dict) else output
            if not isinstance(loss, torch.Tensor):
                return None
            loss.backward()
            synchronize()
            seconds.append(time.perf_counter() - start)
            pl_module.zero_grad(set_to_none=True)
    return min(seconds[TRIAL_WARMUP_STEPS:])


def choose_channels_last(nchw_seconds: float, channels_last_seconds: float, margin: float = TRIAL_MARGIN) -> bool:
    """Whether channels_last's step time beats NCHW's by at least ``margin`` (a fraction of NCHW's)."""
    return channels_last_seconds <= nchw_seconds * (1 - margin)


class MemoryFormatChoices:
    """Measured channels_last choices, one per machine and setting, in a JSON file
    (``tuning/memory_format.json`` in tus's cache folder, :func:`tus.data.cache.cache_root`).

    Like PyTorch's TunableOp results file: timing once per machine keeps later runs from paying
    for the trials again and from choosing differently by timing noise. Delete the file to
    measure again (after a hardware or driver change the key changes by itself).
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else cache_root() / "tuning" / "memory_format.json"

    @staticmethod
    def key(pl_module: L.LightningModule, batch: Any, precision: str) -> str:
        """What the timing depends on: the machine (CPU model or GPU, threads), torch's version, the
        model (its class, its layers' fingerprint and size), the batch (every image tensor's
        batch size, channels and image size), the precision and the trial protocol."""
        parameters = sum(p.numel() for p in pl_module.parameters())
        # The module's repr lists every layer with its shapes and options: two backbones of the same
        # class and size (resnet18 with or without drop rate...) get different fingerprints.
        layers = hashlib.sha256(repr(pl_module).encode()).hexdigest()[:12]
        return " | ".join(
            [
                cpu_model() if pl_module.device.type == "cpu" else torch.cuda.get_device_name(pl_module.device),
                f"torch {torch.__version__}",
                f"{torch.get_num_threads()} threads",
                f"{type(pl_module).__qualname__} {layers} ({parameters} parameters)",
                f"images {image_shapes(batch)}",
                f"precision {precision}",
                f"trial {TRIAL_PROTOCOL}",
            ]
        )

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: measure again and rewrite it

    def get(self, key: str) -> dict | None:
        return self._read().get(key)

    def put(self, key: str, choice: dict) -> None:
        # Two runs writing at once can lose one entry; that only costs a later re-measurement.
        choices = {**self._read(), key: choice}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(choices, indent=2, sort_keys=True))
        except OSError as error:
            rank_zero_info(f"channels_last auto: could not store the choice in {self.path} ({error}); it will be measured again")


class ChannelsLast(Callback):
    """Run the module and its image batches in channels_last.

    ``enabled``: True converts whenever the module has spatial convolutions; False does
    nothing. ``'auto'`` converts convolutional modules on GPUs and, on CPUs, measures: the
    first training batch is timed in both formats (module state rewound, see
    :func:`time_training_step`) unless :class:`MemoryFormatChoices` or the resumed checkpoint
    already holds the choice. Under DDP, or before a CPU fit has measured (a test-only
    trainer), 'auto' follows :func:`tus.hardware.prefers_channels_last`. A module without
    spatial convolutions (a ViT) is never converted. :attr:`active` records the decision;
    :attr:`measured` the CPU timing it came from. Exports stay loadable into NCHW models:
    tus's savers store ``.contiguous()`` tensors.
    """

    def __init__(self, enabled: bool | Literal["auto"] = "auto", choices: MemoryFormatChoices | None = None):
        if enabled not in (True, False, "auto"):
            raise ValueError(f"ChannelsLast(enabled=...) takes True, False or 'auto', got {enabled!r}")
        self.enabled = enabled
        self.choices = choices if choices is not None else MemoryFormatChoices()
        self.active = False
        self.measured: dict | None = None
        self._pending = False  # a one-device fit that decides on its first training batch

    def _measures(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        # One device only: ranks timing apart could choose apart, and DDP needs one layout.
        # prefers_channels_last is False off CPU and CUDA, so other devices are never timed.
        return self.enabled == "auto" and trainer.world_size == 1 and prefers_channels_last(pl_module, pl_module.device.type)

    def _decide(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        if self.enabled is False:
            return False
        if self.enabled == "auto":
            if self.measured is not None and self._measures(trainer, pl_module):
                return bool(self.measured["channels_last"])
            return prefers_channels_last(pl_module, pl_module.device.type)
        return prefers_channels_last(pl_module, "cpu")  # i.e. "has spatial convolutions"

    # The *_start hooks run after the strategy moved the module to its device (which 'auto'
    # asks about) and wrapped it; the conversion keeps parameter identity, so optimisers and
    # DDP buckets made before still hold the same parameters.
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = self.measured is None and self._measures(trainer, pl_module)
        if not self._pending:
            self._start(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._pending:  # the sanity check of a fit that has not measured yet runs as built
            self._start(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = self._decide(trainer, pl_module)
        if self.active:
            to_channels_last(pl_module)

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        key = self.choices.key(pl_module, batch, str(trainer.precision))
        stored = self.choices.get(key)
        if stored is not None:
            self.measured = stored
            return
        if trainer.estimated_stepping_batches < TRIAL_STEPS:
            self.measured = {"channels_last": False, "nchw_ms": None, "channels_last_ms": None}
            rank_zero_info(f"channels_last auto: NCHW untimed (this fit has fewer training steps than the {TRIAL_STEPS} a timing trial takes)")
            return
        best: dict[bool, float] = {}
        for _ in range(TRIAL_ROUNDS):
            for channels_last in (False, True):
                seconds = time_training_step(trainer, pl_module, batch, channels_last=channels_last)
                if seconds is None:
                    self.measured = {"channels_last": prefers_channels_last(pl_module, pl_module.device.type), "nchw_ms": None, "channels_last_ms": None}
                    return
                best[channels_last] = min(seconds, best.get(channels_last, seconds))
        nchw, nhwc = best[False], best[True]
        self.measured = {"channels_last": choose_channels_last(nchw, nhwc), "nchw_ms": round(nchw * 1e3, 2), "channels_last_ms": round(nhwc * 1e3, 2)}
        self.choices.put(key, self.measured)
        choice = "channels_last" if self.measured["channels_last"] else f"NCHW (channels_last is chosen when {TRIAL_MARGIN:.0%} faster)"
        rank_zero_info(
            f"channels_last auto: a training step takes {self.measured['nchw_ms']} ms in NCHW, {self.measured['channels_last_ms']} ms in channels_last on this machine -> {choice} (stored in {self.choices.path})"
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending:
            self._pending = False
            if self.measured is None:
                self._measure(trainer, pl_module, batch)
            self.active = bool(self.measured and self.measured["channels_last"])
            pl_module.to(memory_format=torch.channels_last if self.active else torch.contiguous_format)
        self._convert(batch)

    def _convert(self, batch: Any) -> None:
        if self.active:
            batch_images_to_channels_last(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._convert(batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._convert(batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._convert(batch)

    # The choice travels with the resume checkpoint: a resumed run trains in the same format.
    def state_dict(self) -> dict[str, Any]:
        return {"measured": self.measured} if self.measured is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured = state_dict.get("measured")


class CompileModel(Callback):
    """``trainer.compile: true``: torch.compile each direct child module of the LightningModule
    (in place, ``nn.Module.compile``), so training_step and the loss code stay eager and the
    checkpoint keys stay unchanged. Off by default: on 2-core CPUs compilation costs more than
    the steps it speeds up (see benchmarks/finetune_throughput.py --compile)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for child in pl_module.children():
            child.compile()
