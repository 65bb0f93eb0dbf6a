"""MaskedAutoencoderViT: sin-cos embeddings, encoder on visible patches only, loss and encoder export."""

from __future__ import annotations

import math

import pytest
import torch

from tus.losses.mae import random_masking
from tus.models.mae import MaskedAutoencoderViT, sincos_pos_embed_2d
from tus.models.vit import create_vit_encoder, mae_param_groups


def tiny_mae(**kwargs: object) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    options = {"img_size": 32, "patch_size": 8, "depth": 2, "decoder_embed_dim": 32, "decoder_depth": 1}
    return MaskedAutoencoderViT("vit_tiny_patch16_224", decoder_num_heads=4, **{**options, **kwargs})


def test_sincos_pos_embed_matches_formula() -> None:
    dim, grid_h, grid_w = 8, 2, 3
    embed = sincos_pos_embed_2d(dim, grid_h, grid_w)
    assert embed.shape == (1, 1 + grid_h * grid_w, dim)
    assert torch.equal(embed[0, 0], torch.zeros(dim))
    omegas = [10000 ** (-k / (dim / 4)) for k in range(dim // 4)]
    for index in range(grid_h * grid_w):
        h, w = divmod(index, grid_w)  # patches are row-major
        expected = [math.sin(h * o) for o in omegas] + [math.sin(w * o) for o in omegas] + [math.cos(h * o) for o in omegas] + [math.cos(w * o) for o in omegas]
        assert embed[0, 1 + index].tolist() == pytest.approx(expected, abs=1e-6)
    assert sincos_pos_embed_2d(dim, grid_h, grid_w, cls_token=False).shape == (1, grid_h * grid_w, dim)


def test_position_embeddings_are_fixed_sincos() -> None:
    model = tiny_mae()
    assert not model.encoder.pos_embed.requires_grad
    assert torch.equal(model.encoder.pos_embed, sincos_pos_embed_2d(192, 4, 4))
    assert torch.equal(model.decoder_pos_embed, sincos_pos_embed_2d(32, 4, 4))
    names = {name for name, _ in model.named_parameters()}
    assert "decoder_pos_embed" not in names
    trainable = {id(p) for group in mae_param_groups(model) for p in group["params"]}
    assert id(model.encoder.pos_embed) not in trainable


def test_encoder_never_sees_masked_patches() -> None:
    model = tiny_mae().eval()
    images = torch.randn(2, 1, 32, 32)
    ids_keep, mask, _ = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(3))
    seen_lengths = []
    hook = model.encoder.blocks[0].register_forward_pre_hook(lambda _m, args: seen_lengths.append(args[0].shape[1]))
    with torch.no_grad():
        latent = model.forward_encoder(images, ids_keep)
        # Overwrite every masked pixel: the encoder output must not change.
        pixel_mask = mask.reshape(2, 1, 4, 1, 4, 1).expand(2, 1, 4, 8, 4, 8).reshape(2, 1, 32, 32).bool()
        scrambled = torch.where(pixel_mask, torch.randn_like(images) * 50, images)
        latent_scrambled = model.forward_encoder(scrambled, ids_keep)
    hook.remove()
    assert latent.shape == (2, 1 + 4, 192)
    assert seen_lengths == [5, 5]
    assert torch.equal(latent, latent_scrambled)
    # Visible patches do matter.
    visible = torch.nonzero(mask[0] == 0).flatten()[0].item()
    row, col = divmod(visible, 4)
    changed = images.clone()
    changed[0, 0, row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model.forward_encoder(changed, ids_keep)[0], latent[0])


def test_visible_tokens_match_full_image_encoding_without_attention() -> None:
    """With the blocks removed, visible tokens equal the full-image tokens at the kept positions."""
    model = tiny_mae(depth=0).eval()
    images = torch.randn(2, 1, 32, 32)
    ids_keep, _, _ = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        latent = model.forward_encoder(images, ids_keep)
        full = model.encoder.forward_features(images)
    assert torch.allclose(latent[:, 0], full[:, 0], atol=1e-6)
    for b in range(2):
        assert torch.allclose(latent[b, 1:], full[b, 1 + ids_keep[b]], atol=1e-6)


def reference_mae_loss(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """MAE's ``forward_loss`` with ``norm_pix_loss`` written out patch by patch: each patch's pixels (row, column,
    channel order) normalised by their own mean and unbiased variance (+1e-6), squared error averaged over the
    pixels of a patch, then over the masked patches only."""
    batch, _, height, width = images.shape
    total, count = 0.0, 0.0
    for b in range(batch):
        for index in range(mask.shape[1]):
            if mask[b, index] == 0:
                continue
            row, col = divmod(index, width // patch)
            pixels = images[b, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch].permute(1, 2, 0).reshape(-1)
            target = (pixels - pixels.mean()) / (pixels.var(unbiased=True) + 1e-6) ** 0.5
            total += ((pred[b, index] - target) ** 2).mean()
            count += 1
    return total / count


def test_forward_returns_masked_loss_and_trains() -> None:
    model = tiny_mae()
    images = torch.randn(3, 1, 32, 32)
    out = model(images, mask_ratio=0.75, generator=torch.Generator().manual_seed(5))
    assert out["pred"].shape == (3, 16, 64)
    assert torch.equal(out["mask"].sum(dim=1), torch.full((3,), 12.0))
    assert torch.allclose(out["loss"], reference_mae_loss(images, out["pred"], out["mask"], patch=8), rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.encoder.pos_embed.grad is None


def test_same_generator_gives_same_mask_and_loss() -> None:
    model = tiny_mae().eval()
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        first = model(images, generator=torch.Generator().manual_seed(6))
        second = model(images, generator=torch.Generator().manual_seed(6))
        third = model(images, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first["mask"], second["mask"]) and torch.equal(first["loss"], second["loss"])
    assert not torch.equal(first["mask"], third["mask"])


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_encoder_exports_as_plain_timm_vit(global_pool: str) -> None:
    model = tiny_mae(global_pool=global_pool, img_size=(32, 48))
    images = torch.randn(2, 1, 32, 48)
    model(images)  # a pretraining step must leave the encoder usable on full images
    assert model.encoder.forward_features(images).shape == (2, 1 + 4 * 6, 192)
    assert model.encoder(images).shape == (2, 192)
    rebuilt = create_vit_encoder(**model.encoder_kwargs)
    rebuilt.load_state_dict(model.encoder.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(rebuilt(images), model.encoder(images))


def test_weight_decay_groups_are_mae_main_pretrain_s() -> None:
    """MAE's main_pretrain.py: timm's add_weight_decay with no skip list, i.e. no decay exactly for 1-D parameters
    and biases; the class and mask tokens (3-D) ARE decayed; frozen parameters are in no group."""
    model = tiny_mae()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in mae_param_groups(model, weight_decay=0.05)}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert groups["no_decay"] == {n for n, p in trainable.items() if p.ndim == 1 or n.endswith(".bias")}
    assert groups["decay"] == {n for n, p in trainable.items() if p.ndim > 1 and not n.endswith(".bias")}
    assert {"encoder.cls_token", "mask_token", "encoder.blocks.0.attn.qkv.weight", "decoder_pred.weight"} <= groups["decay"]
    assert {"encoder.blocks.0.norm1.weight", "decoder_pred.bias"} <= groups["no_decay"]
    assert "encoder.pos_embed" not in groups["decay"] | groups["no_decay"]
