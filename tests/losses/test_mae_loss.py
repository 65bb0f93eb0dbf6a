"""MAE maths: patchify, random masking and the masked (norm-pix) reconstruction loss."""

from __future__ import annotations

import pytest
import torch

from tus.losses.mae import mae_loss, patchify, random_masking, unpatchify


def test_patchify_layout_and_round_trip() -> None:
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(images, 2)
    assert patches.shape == (2, 6, 12)
    # Patch 4 is grid row 1, column 1: pixels rows 2-3, columns 2-3, ordered (row, column, channel).
    expected = torch.stack([images[1, c, 2 + i, 2 + j] for i in range(2) for j in range(2) for c in range(3)])
    assert torch.equal(patches[1, 4], expected)
    assert torch.equal(unpatchify(patches, 2, 3, (2, 3)), images)


def test_random_masking_keeps_a_quarter_per_image() -> None:
    ids_keep, mask, ids_restore = random_masking(8, 16, 0.75, generator=torch.Generator().manual_seed(0))
    assert ids_keep.shape == (8, 4)
    assert torch.equal(mask.sum(dim=1), torch.full((8,), 12.0))
    # The kept indices are exactly the visible (mask 0) positions of each image.
    for row in range(8):
        assert set(ids_keep[row].tolist()) == set(torch.nonzero(mask[row] == 0).flatten().tolist())
    # ids_restore inverts the shuffle: the shuffled mask [0]*4 + [1]*12 gathers back to the mask.
    shuffled = torch.cat([torch.zeros(8, 4), torch.ones(8, 12)], dim=1)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), mask)


def test_random_masking_differs_across_images_and_calls() -> None:
    generator = torch.Generator().manual_seed(1)
    _, first, _ = random_masking(6, 64, 0.75, generator=generator)
    _, second, _ = random_masking(6, 64, 0.75, generator=generator)
    assert len({tuple(row.tolist()) for row in first}) == 6
    assert not torch.equal(first, second)
    _, again, _ = random_masking(6, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)


# MAE's random_masking: len_keep = int(L * (1 - mask_ratio)), truncated: 196 patches at 0.9 keep 19 (19.6), 7 at 0.5
# keep 3 (3.5), where rounding would keep 20 and 4.
@pytest.mark.parametrize(("num_patches", "ratio", "kept"), [(49, 0.75, 12), (196, 0.75, 49), (196, 0.9, 19), (7, 0.5, 3), (10, 0.5, 5), (4, 0.0, 4)])
def test_random_masking_kept_count_is_truncated_as_mae(num_patches: int, ratio: float, kept: int) -> None:
    ids_keep, mask, _ = random_masking(2, num_patches, ratio)
    assert ids_keep.shape[1] == kept
    assert torch.equal(mask.sum(dim=1), torch.full((2,), float(num_patches - kept)))


def test_random_masking_rejects_full_mask() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 16, 1.0)


def test_loss_ignores_visible_patches() -> None:
    generator = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 16, 12, generator=generator)
    target = torch.randn(2, 16, 12, generator=generator)
    _, mask, _ = random_masking(2, 16, 0.75, generator=generator)
    for norm_pix in (True, False):
        before = mae_loss(pred, target, mask, norm_pix_loss=norm_pix)
        changed = target.clone()
        visible = torch.nonzero(mask[0] == 0).flatten()[0]
        changed[0, visible] += 100.0 * torch.randn(12, generator=generator)
        assert torch.equal(mae_loss(pred, changed, mask, norm_pix_loss=norm_pix), before)
        masked = torch.nonzero(mask[0] == 1).flatten()[0]
        changed[0, masked] += 5.0
        if not norm_pix:  # a constant shift is normalised away with norm_pix_loss
            assert mae_loss(pred, changed, mask, norm_pix_loss=norm_pix) != before


def test_norm_pix_loss_matches_hand_computation() -> None:
    pred = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]]])
    target = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [9.0, 9.0, 9.0, 9.0], [2.0, 4.0, 6.0, 8.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    # Patch 0: mean 3, unbiased var (4 + 1 + 0 + 9) / 3 = 14/3; pred 0 -> mean of squared normalised pixels.
    std0 = (14 / 3 + 1e-6) ** 0.5
    norm0 = [(-2) / std0, (-1) / std0, 0.0, 3 / std0]
    loss0 = sum(v**2 for v in norm0) / 4
    # Patch 2: mean 5, unbiased var (9 + 1 + 1 + 9) / 3 = 20/3.
    std2 = (20 / 3 + 1e-6) ** 0.5
    norm2 = [-3 / std2, -1 / std2, 1 / std2, 3 / std2]
    loss2 = sum((0.5 - v) ** 2 for v in norm2) / 4
    expected = (loss0 + loss2) / 2
    assert mae_loss(pred, target, mask, norm_pix_loss=True).item() == pytest.approx(expected, rel=1e-6)
    plain = (sum((0 - v) ** 2 for v in [1, 2, 3, 6]) / 4 + sum((0.5 - v) ** 2 for v in [2, 4, 6, 8]) / 4) / 2
    assert mae_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx(plain, rel=1e-6)
