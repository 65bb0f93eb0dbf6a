"""Fine-tuning a ViT: layer-wise lr decay per group, and the schedules scale every group's own rate."""

from __future__ import annotations

import math

import pytest
import torch

from tus.methods.classifier import FineTuneModule, FineTuneOptimConfig
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
