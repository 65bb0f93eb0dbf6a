"""Fine-tuning a ViT: layer-wise lr decay per group, and the schedules scale every group's own rate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tus.methods.classifier import FineTuneModule, FineTuneOptimConfig
from tus.methods.mae import MaskedAutoencoder, MaskedAutoencoderConfig
from tus.models.backbones import BackboneConfig

LR, DECAY, DEPTH = 1e-3, 0.75, 12  # vit_tiny has 12 blocks


def vit_module(**optim: object) -> FineTuneModule:
    backbone = BackboneConfig(name="vit_tiny_patch16_224", init="scratch", img_size=32, patch_size=8, global_pool="avg", drop_path_rate=0.1)
    return FineTuneModule(backbone, FineTuneOptimConfig(lr_head=LR, layer_decay=DECAY, weight_decay=0.05, **optim))


def group_of(optimizer: torch.optim.Optimizer, parameter: torch.nn.Parameter) -> dict:
    return next(g for g in optimizer.param_groups if any(p is parameter for p in g["params"]))


def test_backbone_options_reach_timm() -> None:
    module = vit_module()
    assert module.backbone.patch_embed.grid_size == (4, 4)
    assert module.backbone.global_pool == "avg"
    # timm spaces drop path linearly from 0 to drop_path_rate over the blocks.
    assert module.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_layer_decay_rates_and_their_warmup_cosine_schedule() -> None:
    module = vit_module(schedule="cosine", warmup_epochs=1)
    setup = module.build_optimizers(total_steps=10, steps_per_epoch=2)
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    vit = module.backbone
    peaks = {
        "patch_embed": (vit.patch_embed.proj.weight, LR * DECAY ** (DEPTH + 1)),
        "pos_embed": (vit.pos_embed, LR * DECAY ** (DEPTH + 1)),
        **{f"block{i}": (vit.blocks[i].attn.qkv.weight, LR * DECAY ** (DEPTH - i)) for i in range(DEPTH)},
        "fc_norm": (vit.fc_norm.weight, LR),
        "head": (module.head.weight, LR),
    }
    assert group_of(optimizer, vit.pos_embed)["weight_decay"] == 0.0
    assert group_of(optimizer, vit.blocks[0].attn.qkv.weight)["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))
    # Hand-written schedule: linear warmup over 2 steps ((k + 1) / 2), then cosine from 1 to 0 over 8 steps.
    for step in range(10):
        factor = (step + 1) / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 8))
        for name, (parameter, peak) in peaks.items():
            assert group_of(optimizer, parameter)["lr"] == pytest.approx(peak * factor, rel=1e-6), (name, step)
        optimizer.step()
        scheduler.step()


def test_onecycle_peaks_at_each_groups_own_rate() -> None:
    module = vit_module(schedule="onecycle", warmup_fraction=0.5)
    setup = module.build_optimizers(total_steps=10, steps_per_epoch=None)
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    peak_steps = {}
    for _ in range(10):
        for name, parameter in (("embed", module.backbone.patch_embed.proj.weight), ("head", module.head.weight)):
            peak_steps.setdefault(name, []).append(group_of(optimizer, parameter)["lr"])
        optimizer.step()
        scheduler.step()
    assert max(peak_steps["head"]) == pytest.approx(LR)
    assert max(peak_steps["embed"]) == pytest.approx(LR * DECAY ** (DEPTH + 1))


def test_layer_decay_is_refused_for_a_resnet_and_off_by_default() -> None:
    resnet = BackboneConfig(name="resnet10t", init="scratch")
    module = FineTuneModule(resnet, FineTuneOptimConfig(layer_decay=0.75))
    with pytest.raises(ValueError, match="layer_decay needs a ViT"):
        module.build_optimizers(total_steps=10, steps_per_epoch=2)
    plain = FineTuneModule(resnet, FineTuneOptimConfig(lr_backbone=1e-5, lr_head=1e-4))
    optimizer = plain.build_optimizers(total_steps=10, steps_per_epoch=2)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-5, 1e-4]
    with pytest.raises(ValueError, match="layer_decay"):
        FineTuneOptimConfig(layer_decay=1.5)


def test_tus_mae_export_and_mae_checkpoint_fine_tune_identical_heads(tmp_path: Path) -> None:
    """The two ViT arms of the pretraining-families study: one MAE pretraining written as a tus export (init=tus)
    and as a Facebook-MAE checkpoint (init=mae, the encoder's keys unprefixed, the decoder beside them) fine-tune
    the same network with MAE's main_finetune.py head: mean of the patch tokens, a fresh fc_norm (weight 1, bias 0;
    the pretrained final norm dropped), a linear head with weight ~ trunc_normal(std=2e-5) and bias 0."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(MaskedAutoencoderConfig(image_size=32, patch_size=8, decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2), num_organs=0, batch_size=2)
    for parameter in mae.model.parameters():  # non-default values everywhere, norms included
        nn.init.normal_(parameter, std=0.2)
    mae.export_encoder(tmp_path / "encoder", {"image_size": 32, "method": "mae"})
    checkpoint = tmp_path / "checkpoint-799.pth"
    torch.save({"model": {k.removeprefix("encoder."): v for k, v in mae.model.state_dict().items()}}, checkpoint)

    def arm(init: str, weights: Path) -> FineTuneModule:
        torch.manual_seed(1)
        backbone = BackboneConfig(name="vit_tiny_patch16_224", init=init, weights=str(weights), img_size=32, patch_size=8, global_pool="avg", drop_path_rate=0.1)
        return FineTuneModule(backbone, FineTuneOptimConfig(lr_head=LR, layer_decay=DECAY)).eval()

    tus_arm, mae_arm = arm("tus", tmp_path / "encoder"), arm("mae", checkpoint)
    assert repr(tus_arm.backbone) == repr(mae_arm.backbone) and repr(tus_arm.head) == repr(mae_arm.head)
    tus_state, mae_state = tus_arm.state_dict(), mae_arm.state_dict()
    assert tus_state.keys() == mae_state.keys()
    assert all(torch.equal(tus_state[k], mae_state[k]) for k in tus_state)
    vit = tus_arm.backbone
    assert vit.global_pool == "avg" and isinstance(vit.norm, nn.Identity)
    assert torch.equal(vit.fc_norm.weight, torch.ones(192)) and torch.equal(vit.fc_norm.bias, torch.zeros(192))
    assert torch.equal(tus_arm.head.bias, torch.zeros(2))
    assert 1.5e-5 < tus_arm.head.weight.std().item() < 2.5e-5 and tus_arm.head.weight.abs().max() < 1e-4
    # The pretrained blocks arrived, and the forward is MAE's written out: blocks, mean of patch tokens, LayerNorm.
    assert torch.equal(vit.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        x = torch.cat([(mae.encoder.cls_token + mae.encoder.pos_embed[:, :1]).expand(2, -1, -1), mae.encoder.patch_embed(images) + mae.encoder.pos_embed[:, 1:]], dim=1)
        for block in mae.encoder.blocks.eval():
            x = block(x)
        expected = F.layer_norm(x[:, 1:].mean(dim=1), (192,), eps=1e-6)
        torch.testing.assert_close(tus_arm.backbone(images), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mae_arm.backbone(images), expected, rtol=1e-5, atol=1e-5)
    # Their optimiser groups are the same too (same names, rates and parameter shapes).
    groups = [[(g["name"], g["lr"], [tuple(p.shape) for p in g["params"]]) for g in arm.param_groups()] for arm in (tus_arm, mae_arm)]
    assert groups[0] == groups[1]


def test_scratch_vit_keeps_pytorch_head_init_unless_asked() -> None:
    assert vit_module().head.weight.std().item() > 1e-2  # nn.Linear's kaiming-uniform, not MAE's 2e-5
    backbone = BackboneConfig(name="vit_tiny_patch16_224", init="scratch", img_size=32, patch_size=8, head_init="mae")
    module = FineTuneModule(backbone, FineTuneOptimConfig())
    assert module.head.weight.std().item() < 1e-4 and torch.equal(module.head.bias, torch.zeros(2))
