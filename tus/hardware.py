"""Choosing fast defaults for the machine a run lands on: precision, memory format, threads.

Everything here is a pure policy over a small capability table (:class:`HardwareCaps`), so
the choices can be tested for every kind of machine without one; :func:`detect_caps` is
the only place that asks torch about the hardware.

- Precision: ``auto`` picks ``bf16-mixed`` where bf16 runs natively and fast (Ampere+ GPUs;
  CPUs with AMX; AVX512-BF16 alone measured 7x slower than fp32), ``16-mixed`` on older CUDA GPUs and ``32-true`` otherwise.
  bf16 on a CPU without native support is emulated in software and is roughly 100x slower
  than fp32, so an explicit request for it is honoured but warned about.
- Memory format: convolutions run faster in channels_last (NHWC) on tensor-core GPUs and
  with oneDNN on CPU (measured 1.5x for fp32 ResNet-18 training on a 2-core AMD EPYC);
  transformers gain nothing, their only conv being the patch embedding.
- Threads: OpenCV (augmentation, marker painting) runs on the calling thread, leaving the
  cores to torch (see :func:`keep_opencv_on_calling_thread`).
"""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import timm
import torch
from torch import nn

BF16_PRECISIONS = frozenset({"bf16-mixed", "bf16-true", "bf16"})
GPU_ACCELERATORS = frozenset({"gpu", "cuda"})


@dataclass(frozen=True)
class HardwareCaps:
    """What the machine can do, as far as the precision choice cares."""

    cuda: bool
    cuda_bf16: bool
    cpu_native_bf16: bool


def detect_caps() -> HardwareCaps:
    """Ask torch about this machine's CUDA device and CPU instruction sets."""
    cuda = torch.cuda.is_available()
    # A private torch.cpu helper (torch >= 2.3); a torch without it is treated as a CPU
    # without native bf16, the safe (fp32) choice. Only AMX counts: on a 2-core AMD EPYC with
    # AVX512-BF16 (no AMX), bf16 autocast trained ResNet-18 7x slower than fp32
    # (benchmarks/finetune_throughput.py: 36.7 vs 263 images/s).
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return HardwareCaps(cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(), cpu_native_bf16=bool(amx))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def runs_on_gpu(accelerator: str, caps: HardwareCaps) -> bool:
    """Whether Lightning's ``accelerator`` ('auto', 'cpu', 'gpu', 'cuda') puts the run on a CUDA GPU."""
    accelerator = accelerator.lower()
    if accelerator == "auto":
        return caps.cuda
    if accelerator in GPU_ACCELERATORS:
        return True
    if accelerator == "cpu":
        return False
    raise ValueError(f"unsupported accelerator {accelerator!r}; expected one of auto, cpu, gpu, cuda")


def resolve_precision(requested: str, accelerator: str, caps: HardwareCaps | None = None) -> str:
    """Lightning's precision string for ``requested`` on ``accelerator``.

    ``auto`` becomes the fastest precision that is native to the device; anything else is
    returned unchanged, with a warning when it asks for bf16 on a CPU that would emulate it.
    ``caps`` defaults to :func:`detect_caps` (tests pass their own table).
    """
    caps = detect_caps() if caps is None else caps
    requested = str(requested)
    on_gpu = runs_on_gpu(accelerator, caps)
    if requested != "auto":
        if requested in BF16_PRECISIONS and not on_gpu and not caps.cpu_native_bf16:
            warnings.warn(
                f"precision={requested!r} on a CPU without native bf16 (AVX512-BF16/AMX) is emulated and ~100x slower than 32-true",
                stacklevel=2,
            )
        return requested
    if on_gpu:
        return "bf16-mixed" if caps.cuda_bf16 else "16-mixed"
    return "bf16-mixed" if caps.cpu_native_bf16 else "32-true"


def is_spatial_conv(module: nn.Module) -> bool:
    """A Conv2d that mixes neighbouring pixels, i.e. not 1x1 and not a patchify.

    A ViT's patch embedding is a Conv2d with kernel == stride and no padding: it runs once
    per image and does not make the network convolutional.
    """
    if not isinstance(module, nn.Conv2d):
        return False
    kernel, stride, padding = module.kernel_size, module.stride, module.padding
    if max(kernel) <= 1:
        return False
    patchify = tuple(kernel) == tuple(stride) and padding in ((0, 0), "valid")
    return not patchify


def is_convolutional(model: nn.Module | str) -> bool:
    """Whether ``model`` (a module, or a timm model name) contains a spatial convolution.

    A name is instantiated on the meta device: no memory, no weights, no download.
    """
    if isinstance(model, str):
        with torch.device("meta"):
            model = timm.create_model(model, pretrained=False, num_classes=0)
    return any(is_spatial_conv(m) for m in model.modules())


def prefers_channels_last(model: nn.Module | str, device_type: str) -> bool:
    """Whether ``model`` should run in channels_last on ``device_type`` ('cuda', 'cpu', ...).

    True for convolutional networks on CUDA and CPU (oneDNN's NHWC kernels); False for
    transformers and for other devices, where the benefit is unmeasured.
    """
    if device_type not in ("cuda", "cpu"):
        return False
    return is_convolutional(model)


def to_channels_last(module: nn.Module) -> nn.Module:
    """Convert ``module``'s 4-D parameters and buffers to channels_last in place; returns it."""
    return module.to(memory_format=torch.channels_last)


def batch_to_channels_last(batch: torch.Tensor) -> torch.Tensor:
    """An (N, C, H, W) batch in channels_last layout; other ranks are returned unchanged."""
    if batch.dim() != 4:
        return batch
    return batch.contiguous(memory_format=torch.channels_last)


def keep_opencv_on_calling_thread() -> None:
    """Make OpenCV run each call on the calling thread, without its own thread pool.

    tus calls OpenCV (albumentations, the marker painter) on one small image at a time, in the
    process that also trains. OpenCV's pool then competes with torch's intra-op threads for the
    same cores: on a 2-core AMD EPYC, a 64 px ResNet-18 step with the augmenting loader in the
    process took 127 ms with OpenCV's default pool and 113 ms without it (110 ms on pre-made
    tensors). DataLoader workers forked afterwards inherit the setting.
    """
    cv2.setNumThreads(0)
