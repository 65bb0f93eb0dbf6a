"""Masked-autoencoder maths (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Pure tensor functions, kept apart from the model so they can be tested on their own:

- :func:`patchify` / :func:`unpatchify`: images (B, C, H, W) <-> patch rows (B, L, p*p*C), with the
  pixel order of the reference implementation (row-major patches; inside a patch: row, column, channel).
- :func:`random_masking`: per-image random subset of patches (Sec. 3 "Masking": shuffle by sorting
  uniform noise, keep the first ``int(L * (1 - mask_ratio))``, truncated as the reference's ``len_keep``).
- :func:`mae_loss`: mean squared error on the masked patches only (Sec. 3 "Reconstruction target"),
  optionally against per-patch normalised pixels (``norm_pix_loss``, Sec. 3 and Table 1d).
"""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut ``images`` (B, C, H, W) into non-overlapping patches: (B, (H/p)*(W/p), p*p*C)."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch size {patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
    batch, num_patches, dim = patches.shape
    grid_h, grid_w = grid_hw
    if num_patches != grid_h * grid_w or dim != patch_size * patch_size * channels:
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit a {grid_h}x{grid_w} grid of {patch_size}x{patch_size}x{channels} patches")
    x = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, channels, grid_h * patch_size, grid_w * patch_size)


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw an independent random mask per image, as in the reference ``random_masking``.

    Each image keeps exactly ``int(num_patches * (1 - mask_ratio))`` patches, truncated as the reference's
    ``len_keep`` (25 % at the paper's default ratio 0.75; 196 patches at ratio 0.9 keep 19, not a rounded 20). ``generator`` must live on ``device``.

    Returns:
        ids_keep: (B, kept) indices of the visible patches, in shuffled order (gather these for the encoder).
        mask: (B, L) float, 1 for masked and 0 for visible, in the original patch order.
        ids_restore: (B, L) permutation that undoes the shuffle (used to place decoder mask tokens).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_keep = int(num_patches * (1 - mask_ratio))
    if num_keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    # Ascending noise: the first num_keep patches of the shuffle are kept.
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, mask, ids_restore


def normalize_patches(target_patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised pixels, ``(x - mean) / sqrt(var + eps)`` over each patch's pixels.

    Follows the reference code exactly, including ``Tensor.var``'s default unbiased (Bessel) estimate.
    """
    mean = target_patches.mean(dim=-1, keepdim=True)
    var = target_patches.var(dim=-1, keepdim=True)
    return (target_patches - mean) / (var + eps) ** 0.5


def mae_loss(
    pred: torch.Tensor,
    target_patches: torch.Tensor,
    mask: torch.Tensor,
    norm_pix_loss: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """MSE per patch, averaged over the masked patches only (visible patches carry no loss).

    Args:
        pred: (B, L, p*p*C) decoder predictions.
        target_patches: (B, L, p*p*C) patchified input pixels (:func:`patchify`).
        mask: (B, L), 1 for masked patches.
        norm_pix_loss: regress per-patch normalised pixels (:func:`normalize_patches`), the paper's default.
        eps: added to the per-patch variance.
    """
    if pred.shape != target_patches.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target_patches.shape)} differ in shape")
    target = normalize_patches(target_patches, eps) if norm_pix_loss else target_patches
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()
