"""CAMs of ViTs: the token grid is reshaped right, and Grad-CAM++ / Score-CAM find a planted bright patch."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tus.eval.explain import (
    add_markers,
    cam_mass_share,
    class_activation_maps,
    find_target_layer,
    measure_marker_sensitivity,
    resolve_target_layer,
    token_reshape_transform,
    tokens_to_grid,
)
from tus.models.vit import create_vit_encoder

SIZE = 32
PATCH = 8  # the ViT's patch and the planted square: 8 x 8 of 32 x 32, 6.25 % of the pixels


def patch_images(count: int, with_patch: bool, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Noise around 0 (the normalised mean grey, what Score-CAM's masking fills in) with an optional bright square
    at a random, not grid-aligned place; the squares' masks."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.3, size=(count, 1, SIZE, SIZE)).astype(np.float32)
    masks = np.zeros((count, SIZE, SIZE), dtype=bool)
    for index in range(count):
        y, x = rng.integers(0, SIZE - PATCH + 1, size=2)
        masks[index, y : y + PATCH, x : x + PATCH] = True
        if with_patch:
            images[index, 0][masks[index]] = 2.0
    return torch.from_numpy(images), masks


class ViTClassifier(nn.Module):
    """The fine-tuning layout (``backbone`` + ``head``) around a 2-block ViT-tiny with a class-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = create_vit_encoder("vit_tiny_patch16_224", img_size=SIZE, patch_size=PATCH, depth=2)
        self.head = nn.Linear(self.backbone.num_features, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


@pytest.fixture(scope="module")
def vit_patch_detector() -> ViTClassifier:
    """Trained for 40 full-batch steps until it tells images with the bright square from those without."""
    torch.manual_seed(0)
    model = ViTClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    positives, _ = patch_images(32, True, seed=1)
    negatives, _ = patch_images(32, False, seed=2)
    images = torch.cat([positives, negatives])
    labels = torch.cat([torch.ones(32), torch.zeros(32)]).long()
    for _ in range(40):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()
    test_pos, _ = patch_images(8, True, seed=3)
    test_neg, _ = patch_images(8, False, seed=4)
    with torch.no_grad():
        assert (model(test_pos).argmax(1) == 1).all() and (model(test_neg).argmax(1) == 0).all()
    return model


def test_tokens_to_grid_drops_prefix_tokens_and_keeps_row_major_order() -> None:
    # Token t of the 2 x 3 grid (after 1 class token) holds value t in every channel: grid[y, x] = 3 * y + x.
    tokens = torch.cat([torch.full((1, 1, 4), -7.0), torch.arange(6.0).view(1, 6, 1).expand(1, 6, 4)], dim=1)
    grid = tokens_to_grid(tokens, (2, 3), num_prefix_tokens=1)
    assert grid.shape == (1, 4, 2, 3)
    expected = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    assert torch.equal(grid[0, 2], expected)
    spatial = torch.randn(1, 4, 2, 3)
    assert tokens_to_grid(spatial, (2, 3), 1) is spatial  # a conv output passes unchanged


def test_vit_target_layer_and_reshape_are_chosen_automatically(vit_patch_detector: ViTClassifier) -> None:
    images, _ = patch_images(2, True, seed=5)
    name = find_target_layer(vit_patch_detector, images)
    assert name == "backbone.blocks.1.norm1"
    reshape = token_reshape_transform(vit_patch_detector, name)
    tokens = torch.randn(2, 1 + 16, 192)
    assert reshape(tokens).shape == (2, 192, 4, 4)
    assert token_reshape_transform(nn.Sequential(nn.Conv2d(1, 2, 3)), "0") is None


def hand_gradcam_plus_plus(model: ViTClassifier, images: torch.Tensor) -> np.ndarray:
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19) of the predicted class at the last block's norm1, written out:
    the patch tokens as a (C, 4, 4) map A (class token dropped, row-major), G = d score / d A,
    alpha = G^2 / (2 G^2 + sum_ab A * G^3) (0 where G = 0), w_k = sum_ij relu(G) alpha, CAM = relu(sum_k w_k A_k),
    min-max scaled, bilinearly resized to the input (cv2, as pytorch-grad-cam), min-max scaled again."""
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["tokens"] = output

    hook = model.backbone.blocks[-1].norm1.register_forward_hook(keep)
    try:
        inputs = images.clone().requires_grad_(True)
        logits = model(inputs)
        logits[torch.arange(len(images)), logits.argmax(1)].sum().backward()
    finally:
        hook.remove()
    tokens, grads = captured["tokens"], captured["tokens"].grad
    side = SIZE // PATCH
    activation = tokens[:, 1:].detach().reshape(len(images), side, side, -1).permute(0, 3, 1, 2).double().numpy()
    gradient = grads[:, 1:].reshape(len(images), side, side, -1).permute(0, 3, 1, 2).double().numpy()
    alpha = gradient**2 / (2 * gradient**2 + activation.sum(axis=(2, 3), keepdims=True) * gradient**3 + 1e-6)
    alpha = np.where(gradient != 0, alpha, 0.0)
    weights = (np.maximum(gradient, 0) * alpha).sum(axis=(2, 3))
    cams = []
    for cam in np.maximum((weights[:, :, None, None] * activation).sum(axis=1), 0):
        cam = cam - cam.min()
        cam = cv2.resize(np.float32(cam / (cam.max() + 1e-7)), (SIZE, SIZE))
        cam = np.maximum(cam, 0) - np.maximum(cam, 0).min()
        cams.append(cam / (cam.max() + 1e-7))
    return np.stack(cams)


def test_gradcam_plus_plus_equals_the_formula_written_out(vit_patch_detector: ViTClassifier) -> None:
    images, _ = patch_images(4, True, seed=7)
    name, layer = resolve_target_layer(vit_patch_detector, None, images)
    cams, _ = class_activation_maps(vit_patch_detector, images, layer, "gradcam++", token_reshape_transform(vit_patch_detector, name))
    expected = hand_gradcam_plus_plus(vit_patch_detector, images)
    assert expected.std() > 0.05  # not a flat map that any reshape would reproduce
    np.testing.assert_allclose(cams, expected, atol=1e-4)
    # A transposed token grid (column-major) gives another map: the reshape is what the comparison checks.
    transposed = cv2.resize(np.float32(expected[0].T), (SIZE, SIZE))
    assert np.abs(transposed - cams[0]).max() > 0.05


@pytest.mark.parametrize("method", ["gradcam++", "scorecam"])
def test_cam_mass_concentrates_on_the_planted_patch(vit_patch_detector: ViTClassifier, method: str) -> None:
    images, masks = patch_images(8, True, seed=3)
    name, layer = resolve_target_layer(vit_patch_detector, None, images)
    cams, logits = class_activation_maps(vit_patch_detector, images, layer, method, token_reshape_transform(vit_patch_detector, name))
    assert cams.shape == (8, SIZE, SIZE) and (logits.argmax(1) == 1).all()
    share = cam_mass_share(cams, masks)
    area = masks.reshape(8, -1).mean(1)
    # The square covers 6.25 % of the pixels; a blind map puts about that much mass on it.
    assert np.nanmean(share) > 3 * area.mean(), f"{method}: mass on the patch {share}, area {area.mean():.3f}"


def test_marker_sensitivity_runs_on_a_vit_with_both_methods(vit_patch_detector: ViTClassifier) -> None:
    images, _ = patch_images(2, False, seed=6)
    marked, markers = add_markers(images, np.random.default_rng(0))
    for method in ("gradcam++", "scorecam"):
        result = measure_marker_sensitivity(vit_patch_detector, images, marked, markers, method=method)
        summary = result.summary()
        assert summary["method"] == method and summary["target_layer"] == "backbone.blocks.1.norm1"
        assert result.cams_clean.shape == (2, SIZE, SIZE)
        assert 0.0 <= summary["cam_mass_on_markers_marked"] <= 1.0 or np.isnan(summary["cam_mass_on_markers_marked"])
    with pytest.raises(ValueError, match="CAM method"):
        measure_marker_sensitivity(vit_patch_detector, images, marked, markers, method="lime")
