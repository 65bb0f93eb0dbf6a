"""Contrastive pretraining losses as pure functions: SimCLR's NT-Xent (Chen et al. 2020, Eq. 1,
via lightly, gathered across ranks) and the organ cross-entropy of organ-supervised pretraining
(TesticulUS, Sec. 3.1), which ignores images without an organ label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather_distributed: bool = False) -> torch.Tensor:
    """SimCLR's NT-Xent (Eq. 1-2) for projections of the two views, mean over the 2N anchors.

    With ``gather_distributed`` and an initialised process group, each rank scores its own
    anchors against the views of *all* ranks (lightly gathers them with gradients). A rank's
    loss is the mean over its anchors, so the mean over ranks is the global-batch loss; the
    gather's backward all-reduces gradients, giving each rank world_size x its share of the
    global gradient, which DDP's averaging brings back to exactly the global gradient.
    """
    return NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)(z1, z2)


def organ_ce_loss(logits: torch.Tensor, organs: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over views with a known organ (Eq. 3); unknown organs (-1) are skipped.

    Unlike ``F.cross_entropy(ignore_index=...)`` this is 0 rather than NaN for a batch without
    any known organ. Under DDP each rank averages over its own known organs, which equals the
    global mean when ranks hold as many known organs each (always true for a fully labelled pool).
    """
    per_view = F.cross_entropy(logits, organs.clamp_min(0), reduction="none")
    known = (organs != UNKNOWN_ORGAN).to(per_view.dtype)
    return (per_view * known).sum() / known.sum().clamp_min(1.0)


def organ_accuracy(logits: torch.Tensor, organs: torch.Tensor) -> torch.Tensor:
    """Share of views with a known organ whose argmax is right (NaN-free: 0 when none)."""
    known = organs != UNKNOWN_ORGAN
    correct = (logits.argmax(dim=1) == organs) & known
    return correct.sum().float() / known.sum().clamp_min(1).float()


UNKNOWN_ORGAN = -1
