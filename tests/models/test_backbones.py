"""Backbone initialisations load what was asked for, or fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tus.models.backbones import BackboneConfig, create_backbone, save_encoder, uscl_to_timm_resnet
from tus.models.weights import CheckpointError


def uscl_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in USCL's layout: torchvision ResNet-18 children in `features`, plus heads."""
    import torchvision

    torch.manual_seed(seed)
    resnet = torchvision.models.resnet18(weights=None)
    features = torch.nn.Sequential(*list(resnet.children())[:-1])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["l1.weight"] = torch.randn(512, 512)
    state["l1.bias"] = torch.randn(512)
    state["l2.weight"] = torch.randn(256, 512)
    state["fc.weight"] = torch.randn(3, 512)
    return state, resnet


def test_uscl_key_mapping_drops_heads_and_matches_torchvision(tmp_path: Path):
    state, resnet = uscl_state_dict()
    mapped = uscl_to_timm_resnet(state)
    assert "conv1.weight" in mapped and "layer4.1.bn2.running_var" in mapped
    assert not any(k.startswith(("l1", "l2", "fc")) for k in mapped)
    path = tmp_path / "uscl.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = create_backbone(BackboneConfig(init="uscl", weights=str(path), in_chans=3))
    resnet.fc = torch.nn.Identity()
    resnet.eval(), model.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(model(x), resnet(x), atol=1e-5)


def test_uscl_into_one_channel_sums_rgb_filters(tmp_path: Path):
    state, _ = uscl_state_dict()
    path = tmp_path / "uscl.pth"
    torch.save(state, path)
    model = create_backbone(BackboneConfig(init="uscl", weights=str(path), in_chans=1))
    assert model.conv1.weight.shape[1] == 1
    assert torch.allclose(model.conv1.weight[:, 0], state["features.0.weight"].sum(1), atol=1e-6)


def test_not_a_uscl_file_is_refused(tmp_path: Path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a USCL state dict"):
        create_backbone(BackboneConfig(init="uscl", weights=str(path)))


def test_timm_weights_from_a_local_file(tmp_path: Path):
    reference = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(path))
    model = create_backbone(BackboneConfig(init="timm", weights=str(path), in_chans=1))
    assert torch.allclose(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert torch.allclose(model.conv1.weight[:, 0], reference.conv1.weight.sum(1), atol=1e-5)


def test_missing_or_corrupt_weights_never_fall_back_to_random(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not found"):
        create_backbone(BackboneConfig(init="timm", weights=str(tmp_path / "missing.pth")))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt.pth: not a loadable weights file"):
        create_backbone(BackboneConfig(init="uscl", weights=str(corrupt)))
    with pytest.raises(CheckpointError, match="needs a weights file"):
        create_backbone(BackboneConfig(init="tus"))
    with pytest.raises(CheckpointError, match="takes no weights"):
        create_backbone(BackboneConfig(init="scratch", weights="x.pth"))


def test_wrong_architecture_weights_are_refused_with_shapes(tmp_path: Path):
    encoder = create_backbone(BackboneConfig(name="resnet10t", init="scratch"))
    path = save_encoder(encoder, BackboneConfig(name="resnet10t"), tmp_path / "enc")
    with pytest.raises(CheckpointError, match="encoder is a 'resnet10t', but backbone.name is 'resnet18'"):
        create_backbone(BackboneConfig(name="resnet18", init="tus", weights=str(path)))
    with pytest.raises(CheckpointError, match="takes 1 input channel"):
        create_backbone(BackboneConfig(name="resnet10t", init="tus", weights=str(path), in_chans=3))
    loaded = create_backbone(BackboneConfig(name="resnet10t", init="tus", weights=str(path)))
    x = torch.randn(2, 1, 32, 32)
    encoder.eval(), loaded.eval()
    assert torch.equal(encoder(x), loaded(x))
