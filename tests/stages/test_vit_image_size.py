"""Where a ViT's input size comes from when fine-tuning (issue 23): an unset model.img_size is
data.image_size (a 32 px MAE export's position embeddings are resized to it), and a
model.img_size that differs from data.image_size is refused in one line before any run dir,
instead of timm's "Input height (32) doesn't match model (64)" in the first batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tus.config import ConfigError, load_config
from tus.models.backbones import BackboneConfig, create_backbone, save_encoder
from tus.models.vit import create_vit_encoder
from tus.stages.finetune_cv import FineTuneCVConfig, backbone_for_inputs, run_cv

VIT = {"img_size": 32, "patch_size": 8, "in_chans": 1, "depth": 2}


@pytest.fixture
def vit_export(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    torch.manual_seed(0)
    encoder = create_vit_encoder("vit_tiny_patch16_224", **VIT)
    config = BackboneConfig(name="vit_tiny_patch16_224", init="scratch")
    path = save_encoder(encoder, config, tmp_path / "encoder", {"vit": VIT, "image_size": 32})
    return path, encoder.pos_embed.detach().clone()


def tus_init(export: Path, img_size: int | None = None) -> BackboneConfig:
    return BackboneConfig(name="vit_tiny_patch16_224", init="tus", weights=str(export), img_size=img_size, patch_size=8)


def test_unset_img_size_is_the_data_size_and_keeps_the_exports_embeddings(vit_export):
    export, pos_embed = vit_export
    config = backbone_for_inputs(tus_init(export), 32)
    assert config.img_size == 32
    model = create_backbone(config).eval()
    assert torch.equal(model.pos_embed, pos_embed)  # same grid: loaded unchanged
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 192)


def test_a_larger_data_size_resizes_the_exports_embeddings(vit_export):
    export, pos_embed = vit_export
    model = create_backbone(backbone_for_inputs(tus_init(export), 48)).eval()
    assert tuple(model.patch_embed.grid_size) == (6, 6)  # 48 px / 8 px patches
    assert model.pos_embed.shape == (1, 1 + 36, 192)
    assert torch.equal(model.pos_embed[:, 0], pos_embed[:, 0])  # the class token's embedding is not resized
    assert model(torch.zeros(1, 1, 48, 48)).shape == (1, 192)


def test_a_different_img_size_is_refused_naming_both_keys(vit_export):
    export, _ = vit_export
    with pytest.raises(ConfigError) as error:
        backbone_for_inputs(tus_init(export, img_size=64), 32)
    message = str(error.value)
    assert "model.img_size=64" in message and "data.image_size=32" in message and "\n" not in message
    # A plain timm ViT likewise; a CNN takes any size and is left as it is.
    with pytest.raises(ConfigError, match="model.img_size=64"):
        backbone_for_inputs(BackboneConfig(name="vit_tiny_patch16_224", init="scratch", img_size=64), 32)
    resnet = BackboneConfig(name="resnet10t", init="scratch")
    assert backbone_for_inputs(resnet, 32) is resnet


def test_vit_cpu_recipe_on_a_32px_export_stops_before_any_run_dir(vit_export, tmp_path: Path):
    export, _ = vit_export
    overrides = ["--data.image_size=32", "--model.init=tus", f"--model.weights={export}", f"--output_root={tmp_path / 'runs'}", "--data.manifest=unused.csv"]
    config = load_config(FineTuneCVConfig, "finetune/vit_cpu", overrides)
    with pytest.raises(ConfigError, match=r"model\.img_size=64 but data\.image_size=32"):
        run_cv(config)
    assert not (tmp_path / "runs").exists()
