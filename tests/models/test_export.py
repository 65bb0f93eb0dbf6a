"""One export format (tus.models.export): round trips of each kind, old single-file exports, refusals."""

from __future__ import annotations

import json
import os
import pickle
import stat
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tus
from tus.methods.classifier import FineTuneModule, load_finetuned, save_finetuned
from tus.methods.iddpm import (
    DiffusionCheckpointError,
    ProcessConfig,
    UNetConfig,
    UNetExport,
    build_unet,
    load_unet_export,
    save_unet_export,
)
from tus.models.backbones import BackboneConfig, create_backbone, save_encoder
from tus.models.export import load_export
from tus.models.weights import CheckpointError

TINY_UNET = UNetConfig(sample_size=16, base_channels=32, channel_mults=(1,), attention_resolutions=(), attention_head_dim=32, layers_per_block=1)
ENCODER = BackboneConfig(name="resnet10t", init="scratch")


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


def _classifier() -> FineTuneModule:
    torch.manual_seed(0)
    return FineTuneModule(ENCODER, {"lr_head": 1e-3}).eval()


def test_encoder_round_trip_gives_the_same_tensors_and_outputs(tmp_path: Path):
    torch.manual_seed(0)
    encoder = create_backbone(ENCODER).eval()
    folder = save_encoder(encoder, ENCODER, tmp_path / "encoder", extra={"image_size": 32, "organ_classes": ["a", "b"]})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    for given in (folder, folder / "config.json", folder / "model.safetensors"):
        config, state = load_export(given)
        _same_state(state, encoder.state_dict())
    assert config["kind"] == "encoder" and config["tus_version"] == tus.__version__ and config["format_version"] == 1
    assert config["architecture"] == {"library": "timm", "builder": "timm.create_model", "name": "resnet10t", "kwargs": {"num_classes": 0}}
    assert (config["in_chans"], config["image_size"], config["organ_classes"]) == (1, 32, ["a", "b"])
    assert config["normalization"] == {"mean": [0.5], "std": [0.25]}  # tus.data.transforms' A.Normalize
    rebuilt = create_backbone(BackboneConfig(name="resnet10t", init="tus", weights=str(folder))).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), encoder(x))


def test_classifier_round_trip_keeps_the_fold_run_dir_path(tmp_path: Path):
    module = _classifier()
    # tus finetune-cv passes <fold run dir>/model: the export folder is the fold's run dir.
    folder = save_finetuned(module, tmp_path / "model", image_size=32)
    assert folder == tmp_path and (tmp_path / "model.safetensors").is_file()
    config, state = load_export(tmp_path / "model.safetensors", "classifier")
    _same_state(state, module.state_dict())
    assert config["label_names"] == ["homogeneous", "inhomogeneous"] and config["image_size"] == 32
    assert config["architecture"]["name"] == "resnet10t" and config["num_classes"] == 2
    loaded = load_finetuned(tmp_path)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))


def test_unet_round_trip_uses_diffusers_layout(tmp_path: Path):
    torch.manual_seed(0)
    unet = build_unet(TINY_UNET).eval()
    export = UNetExport(unet=TINY_UNET, process=ProcessConfig(num_timesteps=10), step=5)
    folder = save_unet_export(unet, export, tmp_path / "ema_unet_step0000005")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    raw = json.loads((folder / "config.json").read_text())
    assert raw["_class_name"] == "UNet2DModel" and raw["_tus"]["kind"] == "unet"
    config, state = load_export(folder)
    _same_state(state, unet.state_dict())
    assert config["architecture"]["kwargs"]["block_out_channels"] == [32] and config["step"] == 5
    assert config["normalization"] == {"mean": [0.5], "std": [0.5]}  # images in [-1, 1]
    loaded, loaded_export = load_unet_export(folder / "config.json")
    assert loaded_export == export
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t).sample, unet(x, t).sample)
    with pytest.raises(FileExistsError):
        save_unet_export(unet, export, folder)


def _old_export(path: Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """The single-file writer of tus 0.1 before the folder format: NAME.safetensors + NAME.json."""
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path.with_suffix(".safetensors")


def test_old_single_file_exports_of_each_kind_still_load(tmp_path: Path):
    torch.manual_seed(0)
    encoder = create_backbone(ENCODER).eval()
    old = _old_export(tmp_path / "encoder", encoder.state_dict(), {"backbone": "resnet10t", "in_chans": 1, "num_features": 512, "steps": 7})
    config, _ = load_export(old)
    assert (config["kind"], config["format_version"], config["steps"]) == ("encoder", 0, 7)
    rebuilt = create_backbone(BackboneConfig(name="resnet10t", init="tus", weights=str(old))).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), encoder(x))

    module = _classifier()
    old = _old_export(tmp_path / "model", module.state_dict(), json.loads(json.dumps(dict(module.hparams))))
    with torch.no_grad():
        assert torch.equal(load_finetuned(old)(x), module(x))

    unet = build_unet(TINY_UNET).eval()
    export = UNetExport(unet=TINY_UNET, process=ProcessConfig(num_timesteps=10), step=4)
    old = _old_export(tmp_path / "ema_unet_step0000004", unet.state_dict(), asdict(export))
    loaded, loaded_export = load_unet_export(old.with_suffix(".json"))
    assert loaded_export == export
    _same_state(loaded.state_dict(), unet.state_dict())


def test_a_pickle_given_as_an_export_is_refused_in_one_line(tmp_path: Path):
    payload = tmp_path / "model.bin"
    payload.write_bytes(pickle.dumps({"weight": print}, protocol=4))
    with pytest.raises(CheckpointError, match="refused") as error:
        load_export(payload)
    assert "\n" not in str(error.value) and "model.bin" in str(error.value)
    # A pickle under the export's own weights name is refused too, not unpickled.
    save_finetuned(_classifier(), tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").write_bytes(pickle.dumps({"weight": print}, protocol=4))
    with pytest.raises(CheckpointError, match="refused"):
        load_finetuned(tmp_path / "run")


def test_an_export_of_another_kind_is_named(tmp_path: Path):
    folder = save_encoder(create_backbone(ENCODER), ENCODER, tmp_path / "encoder")
    with pytest.raises(CheckpointError, match=r"this is an encoder export \(tus pretrain\), not a fine-tuned classifier export"):
        load_finetuned(folder)
    with pytest.raises(DiffusionCheckpointError, match="this is an encoder export .*, not a diffusion U-Net export"):
        load_unet_export(folder)
    save_finetuned(_classifier(), tmp_path / "fold")
    with pytest.raises(CheckpointError, match="this is a fine-tuned classifier export .*, not an encoder export"):
        create_backbone(BackboneConfig(name="resnet10t", init="tus", weights=str(tmp_path / "fold")))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_get_the_mode_the_umask_gives_new_files(tmp_path: Path, umask: int):
    """safetensors writes 0600 whatever the umask; a lab sharing a run folder must read exports."""
    previous = os.umask(umask)
    try:
        encoder = save_encoder(create_backbone(ENCODER), ENCODER, tmp_path / "encoder")
        unet = save_unet_export(build_unet(TINY_UNET), UNetExport(unet=TINY_UNET, process=ProcessConfig(num_timesteps=10), step=1), tmp_path / "unet")
        (tmp_path / "plain.txt").write_text("x")  # what open() makes under this umask
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == expected
    files = [*Path(encoder).rglob("*.*"), *Path(unet).rglob("*.*")]
    assert any(f.suffix == ".safetensors" for f in files)
    for file in files:
        if file.is_file():
            assert stat.S_IMODE(file.stat().st_mode) == expected, f"{file.name}: {oct(file.stat().st_mode)}"
