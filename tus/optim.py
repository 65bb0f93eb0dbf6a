"""AdamW on PyTorch's fused kernel, LARS with bias/norm exclusion, batch-scaled learning rates
and warmup + decay schedules.

LARS (You et al. 2017), as SimCLR uses it: every weight matrix / conv kernel gets a
layer-wise trust ratio and weight decay; biases and normalisation parameters get neither
(plain SGD with momentum). With timm's :class:`timm.optim.Lars` that is two parameter
groups: an *adapted* group with ``always_adapt=True`` (so it is adapted even when the weight
decay is set to 0) and an *excluded* group with ``weight_decay=0`` and
``always_adapt=False``; timm computes no trust ratio (hence no LARC ``trust_clip``) for a
group that has neither.

Schedules are a multiplier of the peak learning rate per optimizer step (for
``torch.optim.lr_scheduler.LambdaLR``): linear warmup, then cosine or polynomial decay.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from timm.optim import Lars
from torch import nn

# The reference recipe quotes learning rates per 256 images (SimCLR: lr = base * B / 256).
LR_REFERENCE_BATCH = 256


@dataclass
class LarsConfig:
    """LARS hyper-parameters; ``lr_per_256`` is scaled by the global batch (see :func:`scaled_lr`)."""

    lr_per_256: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coeff: float = 0.001
    trust_clip: bool = False
    exclude_bias_and_norm: bool = True


@dataclass
class ScheduleConfig:
    """Linear warmup over ``warmup_steps``, then ``decay`` down to ``min_lr_ratio`` x peak."""

    warmup_steps: int = 0
    decay: Literal["cosine", "poly", "constant"] = "cosine"
    # (1 - progress) ** poly_power; the reference code's polynomial decay uses power 1 (linear).
    poly_power: float = 1.0
    min_lr_ratio: float = 0.0


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, on the fused kernel where every parameter allows it.

    Why: the default per-tensor loop costs 14 ms a step for ResNet-18's 11M parameters on a
    2-core CPU, 15% of a 64 px batch-16 training step; the fused kernel (one pass over all
    tensors, CPU and CUDA) takes 4.6 ms. It computes the same update up to float rounding.
    Parameters on other devices (MPS, XLA) or in other dtypes keep the default path.
    """
    groups = list(params)
    tensors = [p for group in groups for p in (group["params"] if isinstance(group, dict) else [group])]
    fusable = bool(tensors) and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) for p in tensors)
    return torch.optim.AdamW(groups, **kwargs, fused=fusable or None)


def scaled_lr(lr_per_256: float, global_batch: int) -> float:
    """The peak learning rate for ``global_batch`` images per optimizer step."""
    if global_batch <= 0:
        raise ValueError(f"the global batch must be positive, got {global_batch}")
    return lr_per_256 * global_batch / LR_REFERENCE_BATCH


def is_excluded_from_lars(name: str, parameter: nn.Parameter) -> bool:
    """Biases and normalisation scales/shifts: every 1-D parameter, plus anything named ``*.bias``."""
    return parameter.ndim <= 1 or name.endswith(".bias")


def lars_param_groups(model: nn.Module, config: LarsConfig) -> list[dict]:
    """Split trainable parameters into the adapted and the excluded LARS groups.

    Frozen parameters (``requires_grad=False``) are left out. Each group carries a ``name``
    so logs and tests can tell them apart.
    """
    adapted, excluded = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if config.exclude_bias_and_norm and is_excluded_from_lars(name, parameter):
            excluded.append(parameter)
        else:
            adapted.append(parameter)
    groups = [
        {
            "name": "lars_adapted",
            "params": adapted,
            "weight_decay": config.weight_decay,
            "always_adapt": True,
            "trust_clip": config.trust_clip,
        }
    ]
    if excluded:
        groups.append(
            {
                "name": "lars_excluded",
                "params": excluded,
                "weight_decay": 0.0,
                "always_adapt": False,
                "trust_clip": False,
            }
        )
    return [g for g in groups if g["params"]]


def build_lars(model: nn.Module, config: LarsConfig, lr: float) -> Lars:
    """timm's LARS over :func:`lars_param_groups` at peak learning rate ``lr``."""
    groups = lars_param_groups(model, config)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return Lars(groups, lr=lr, momentum=config.momentum, trust_coeff=config.trust_coeff)


def lr_multiplier(step: int, total_steps: int, config: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if total_steps <= 0:
        raise ValueError(f"a schedule needs a positive number of steps, got {total_steps}")
    if step < config.warmup_steps:
        # (step + 1) so the very first update is already non-zero.
        return (step + 1) / config.warmup_steps
    if config.decay == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    if config.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif config.decay == "poly":
        shape = (1.0 - progress) ** config.poly_power
    else:
        raise ValueError(f"unknown decay '{config.decay}'; use cosine, poly or constant")
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def schedule_lambda(total_steps: int, config: ScheduleConfig) -> Callable[[int], float]:
    """``lr_lambda`` for ``LambdaLR`` stepped once per optimizer step.

    A ``functools.partial`` rather than a closure: it pickles (spawned DDP workers), and
    ``LambdaLR.state_dict`` stores nothing of it, so checkpoints stay plain tensors/numbers.
    """
    if config.warmup_steps < 0 or config.warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={config.warmup_steps} must lie in 0..{total_steps} (the step budget)")
    return functools.partial(lr_multiplier, total_steps=total_steps, config=config)
