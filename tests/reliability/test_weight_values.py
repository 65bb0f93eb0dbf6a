"""Exports that loaded as a pretrained init but could not be one (issue 23): int8 or otherwise
non-floating tensors, NaN, all zeros; and a timm ``checkpoint_path`` smuggled through an
export's architecture kwargs, which would make timm unpickle a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.bad_inputs.test_bad_inputs import MARKER, write_payload
from tus.models.backbones import BackboneConfig, create_backbone, save_encoder
from tus.models.vit import create_vit_encoder

CNN = BackboneConfig(name="resnet10t", init="scratch")
VIT_KWARGS = {"img_size": 32, "patch_size": 16, "depth": 1, "in_chans": 1}


def cnn_export(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_encoder(create_backbone(CNN), CNN, tmp_path / "encoder")


def vit_export(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    encoder = create_vit_encoder("vit_tiny_patch16_224", **VIT_KWARGS)
    return save_encoder(encoder, BackboneConfig(name="vit_tiny_patch16_224", init="scratch"), tmp_path / "vit", extra={"vit": VIT_KWARGS})


def rewrite(folder: Path, change) -> None:
    weights = folder / "model.safetensors"
    state = load_file(weights)
    save_file(change(state), str(weights))


def int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A naive int8 "quantisation": floating tensors scaled and stored as int8 (no scales kept)."""
    return {k: (v * 127).round().clamp(-128, 127).to(torch.int8) if v.is_floating_point() else v for k, v in state.items()}


def with_nan(state):
    first = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[first] = state[first].clone()
    state[first].view(-1)[0] = float("nan")
    return state


def zeros(state):
    return {k: torch.zeros_like(v) for k, v in state.items()}


@pytest.mark.parametrize(("change", "words"), [(int8, "int8 where the model holds floating-point weights"), (with_nan, "NaN or infinite"), (zeros, "every weight tensor is all zeros")])
@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_an_export_that_cannot_be_trained_weights_is_refused(tmp_path: Path, kind: str, change, words: str):
    folder = cnn_export(tmp_path) if kind == "cnn" else vit_export(tmp_path)
    rewrite(folder, change)
    name = "resnet10t" if kind == "cnn" else "vit_tiny_patch16_224"
    with pytest.raises(ValueError) as error:
        create_backbone(BackboneConfig(name=name, init="tus", weights=str(folder), **({"img_size": 32} if kind == "vit" else {})))
    message = str(error.value)
    assert "\n" not in message and str(folder) in message and words in message, message


def test_a_float_export_still_loads_and_gives_its_weights(tmp_path: Path):
    folder = cnn_export(tmp_path)
    model = create_backbone(BackboneConfig(name="resnet10t", init="tus", weights=str(folder)))
    saved = load_file(folder / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_a_single_zero_kernel_is_reported_not_refused(tmp_path: Path, capsys):
    folder = cnn_export(tmp_path)
    key = "layer1.0.conv1.weight"
    rewrite(folder, lambda state: {**state, key: torch.zeros_like(state[key])})
    create_backbone(BackboneConfig(name="resnet10t", init="tus", weights=str(folder)))
    assert f"1 weight tensor(s) are all zeros (e.g. {key})" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["checkpoint_path", "pretrained", "pretrained_cfg_overlay"])
def test_a_timm_loader_option_in_export_kwargs_is_refused_and_no_code_runs(tmp_path: Path, option: str):
    folder = vit_export(tmp_path)
    marker = tmp_path / MARKER
    payload = write_payload(tmp_path / "payload.pth", marker, "torch-legacy")
    config = json.loads((folder / "config.json").read_text())
    value = {"checkpoint_path": str(payload), "pretrained": True, "pretrained_cfg_overlay": {"file": str(payload)}}[option]
    config["architecture"]["kwargs"][option] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        create_backbone(BackboneConfig(name="vit_tiny_patch16_224", init="tus", weights=str(folder)))
    message = str(error.value)
    assert "\n" not in message and "config.json" in message and repr(option) in message and "refused" in message, message
    assert not marker.exists(), "a pickle payload ran"


def test_a_timm_checkpoint_path_would_unpickle_the_file(tmp_path: Path):
    """What the allow-list stops is live: timm given checkpoint_path does read the named file."""
    import timm

    torch.save({"not": "weights"}, tmp_path / "ckpt.pth")
    with pytest.raises(Exception) as error:  # noqa: PT011 - timm raises whatever its loader meets
        timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, checkpoint_path=str(tmp_path / "ckpt.pth"), **VIT_KWARGS)
    assert "ckpt" in str(error.value) or "state_dict" in str(error.value) or "key" in str(error.value).lower()
