"""Grad-CAM++: it localises what the model reacts to, leaves the model as found, runs in validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import tus.callbacks.gradcam as gradcam_module
from tests.helpers import free_port
from tus.callbacks.gradcam import GradCAMConfig, GradCAMPlusPlusLogger
from tus.callbacks.loss_recorder import PerSampleLossRecorder
from tus.cli.explain import main as explain_main
from tus.data.images import UsageError, write_grayscale
from tus.eval.explain import (
    TargetLayerError,
    add_markers,
    find_target_layer,
    gradcam_plus_plus,
    measure_marker_sensitivity,
    resolve_target_layer,
)
from tus.methods.classifier import FineTuneModule, FineTuneOptimConfig, save_finetuned
from tus.models.backbones import BackboneConfig
from tus.stages.finetune_cv import FineTuneCVConfig, finetune_callbacks

SIZE = 32
PATCH = 8  # 8 x 8 of 32 x 32: 6.25% of the pixels


def patch_images(count: int, with_patch: bool, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Dim noise images, optionally with a bright square at a random place; the squares' masks."""
    rng = np.random.default_rng(seed)
    images = rng.normal(-1.0, 0.3, size=(count, 1, SIZE, SIZE)).astype(np.float32)
    masks = np.zeros((count, SIZE, SIZE), dtype=bool)
    for index in range(count):
        y, x = rng.integers(0, SIZE - PATCH, size=2)
        masks[index, y : y + PATCH, x : x + PATCH] = True
        if with_patch:
            images[index, 0][masks[index]] = 2.0
    return torch.from_numpy(images), masks


@pytest.fixture(scope="module")
def patch_detector() -> nn.Module:
    """A small CNN trained until it calls 'positive' exactly when a bright patch is present."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    positives, _ = patch_images(32, True, seed=1)
    negatives, _ = patch_images(32, False, seed=2)
    images = torch.cat([positives, negatives])
    labels = torch.cat([torch.ones(32), torch.zeros(32)]).long()
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    test_pos, _ = patch_images(16, True, seed=3)
    test_neg, _ = patch_images(16, False, seed=4)
    with torch.no_grad():
        assert (model(test_pos).argmax(1) == 1).all() and (model(test_neg).argmax(1) == 0).all()
    return model


def hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks) for m in model.modules()]


def test_cam_mass_concentrates_on_the_planted_patch(patch_detector):
    images, masks = patch_images(12, True, seed=5)
    name, layer = resolve_target_layer(patch_detector, None, images)
    assert name == "5"  # the last ReLU: the pool after it has no spatial extent
    cams, logits = gradcam_plus_plus(patch_detector, images, layer)
    assert cams.shape == (12, SIZE, SIZE) and (logits.argmax(1) == 1).all()
    share = (cams * masks).reshape(12, -1).sum(1) / cams.reshape(12, -1).sum(1)
    assert masks[0].mean() < 0.15
    assert np.median(share) > 0.5 and share.min() > 0.3, share


def test_marker_sensitivity_of_a_model_that_reacts_to_the_marker(patch_detector):
    clean, masks = patch_images(10, False, seed=6)
    # The "marker" here is the very patch the model reacts to: predictions must flip and the
    # marked CAMs must sit on it, while the clean CAMs spread over the image.
    marked = clean.clone()
    marked[:, 0][torch.from_numpy(masks)] = 2.0
    result = measure_marker_sensitivity(patch_detector, clean, marked, masks)
    summary = result.summary()
    assert summary["prediction_change_rate"] == 1.0
    assert summary["marker_area"] == pytest.approx(PATCH * PATCH / SIZE**2)
    assert summary["cam_mass_on_markers_marked"] > 0.5
    assert summary["cam_mass_on_markers_clean"] < 0.3
    assert (result.probabilities_marked > 0.5).all() and (result.probabilities_clean < 0.5).all()


def test_explaining_leaves_hooks_modes_and_gradients_as_found(patch_detector):
    model = patch_detector
    model.train()
    model[0].eval()
    frozen = model[2].bias
    frozen.requires_grad_(False)
    model.zero_grad()
    grad = torch.full_like(model[-1].weight, 0.5)
    model[-1].weight.grad = grad
    before = hook_counts(model)
    images, _ = patch_images(4, True, seed=7)
    try:
        with torch.inference_mode():  # as in Lightning's validation loop
            find_target_layer(model, images)
            gradcam_plus_plus(model, images, model[5])
        assert hook_counts(model) == before
        assert model.training and not model[0].training and model[2].training
        assert model[-1].weight.grad is grad and torch.equal(grad, torch.full_like(grad, 0.5))
        assert model[0].weight.grad is None
        assert not frozen.requires_grad and model[0].weight.requires_grad
    finally:
        frozen.requires_grad_(True)
        model[-1].weight.grad = None
        model.eval()


def test_unknown_target_layer_names_the_modules(patch_detector):
    with pytest.raises(TargetLayerError, match="no module 'backbone.layer4'"):
        resolve_target_layer(patch_detector, "backbone.layer4", torch.zeros(1, 1, SIZE, SIZE))


def test_markers_change_only_marker_pixels():
    images = torch.randn(3, 1, SIZE, SIZE)
    marked, masks = add_markers(images, np.random.default_rng(0))
    assert masks.shape == (3, SIZE, SIZE) and masks.any(axis=(1, 2)).all()
    assert torch.equal(marked[:, 0][~torch.from_numpy(masks)], images[:, 0][~torch.from_numpy(masks)])


class TinyImages(Dataset):
    def __init__(self, count: int):
        generator = torch.Generator().manual_seed(count)
        self.images = torch.randn(count, 1, SIZE, SIZE, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "sample_id": f"img{index}", "label": index % 2, "index": index}


class TinyData(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TinyImages(8), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TinyImages(6), batch_size=6)

    def test_dataloader(self):
        return DataLoader(TinyImages(5), batch_size=5)


def tiny_classifier() -> FineTuneModule:
    torch.manual_seed(0)
    return FineTuneModule(BackboneConfig(name="test_resnet", init="scratch"), FineTuneOptimConfig())


def test_logger_runs_in_validation_and_test_and_leaves_no_hooks(tmp_path):
    module = tiny_classifier()
    before = hook_counts(module)
    logger = GradCAMPlusPlusLogger(tmp_path / "gradcam", num_images=3)
    csv = L.pytorch.loggers.CSVLogger(str(tmp_path), name="", version="")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=csv,
        callbacks=[logger],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, datamodule=TinyData())
    trainer.test(module, datamodule=TinyData(), verbose=False)

    written = sorted(p.name for p in (tmp_path / "gradcam").iterdir())
    # the sanity check is skipped; one grid + numbers per validation and one for the test
    assert written == ["test-epoch002.json", "test-epoch002.png", "val-epoch000.json", "val-epoch000.png", "val-epoch001.json", "val-epoch001.png"]
    numbers = json.loads((tmp_path / "gradcam" / "val-epoch001.json").read_text())
    # at 32 px the ResNet's layer4 map is 1 x 1, so the last layer with a spatial map is layer3
    assert numbers["images"] == ["img0", "img1", "img2"] and numbers["target_layer"] == "backbone.layer3"
    assert 0 <= numbers["cam_mass_on_markers_marked"] <= 1 and 0 < numbers["marker_area"] < 0.5
    assert hook_counts(module) == before
    assert all(p.requires_grad for p in module.parameters())
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["val/markers/prediction_change_rate"].notna().sum() == 2
    assert metrics["test/markers/cam_mass_on_markers_clean"].notna().sum() == 1


def test_explain_command_writes_overlays_and_numbers(tmp_path, capsys):
    model_path = tmp_path / "model"
    save_finetuned(tiny_classifier(), model_path)
    rng = np.random.default_rng(0)
    for index in range(3):
        write_grayscale(tmp_path / "images" / f"u{index}.png", rng.integers(0, 255, size=(48, 40), dtype=np.uint8))
    pd.DataFrame({"path": [f"u{i}.png" for i in range(2)]}).to_csv(tmp_path / "images" / "manifest.csv", index=False)
    out = tmp_path / "explained"
    args = ["--checkpoint", str(tmp_path / "model.safetensors"), "--images", str(tmp_path / "images" / "manifest.csv"), str(tmp_path / "images" / "u2.png"), "--out", str(out)]

    with pytest.raises(UsageError):  # no training config beside the model: the size must be given
        explain_main(args)
    assert explain_main([*args, "--image-size", "32", "--rows-per-page", "2"]) == 0

    assert sorted(p.name for p in out.iterdir()) == ["marker_sensitivity.json", "overlays-000.png", "overlays-001.png", "per_image.csv"]
    per_image = pd.read_csv(out / "per_image.csv")
    assert per_image["image"].tolist() == ["u0.png", "u1.png", str(tmp_path / "images" / "u2.png")]
    summary = json.loads((out / "marker_sensitivity.json").read_text())
    assert summary["num_images"] == 3 and summary["image_size"] == 32
    assert summary["prediction_change_rate"] == pytest.approx((per_image["predicted_clean"] != per_image["predicted_marked"]).mean())
    assert "CAM mass on marker pixels" in capsys.readouterr().out
    with pytest.raises(UsageError):  # never writes into a non-empty folder
        explain_main([*args, "--image-size", "32"])


def test_logger_under_ddp_explains_on_rank_zero_only(tmp_path, monkeypatch):
    calls = tmp_path / "calls.txt"
    real_save = gradcam_module.save_overlay_grid

    def counting_save(result, names, path, labels=None):
        with calls.open("a") as handle:
            handle.write(f"{os.getpid()}\n")
        return real_save(result, names, path, labels)

    monkeypatch.setattr(gradcam_module, "save_overlay_grid", counting_save)
    # Lightning's launcher sets MASTER_PORT in this process; keep it from leaking to later tests.
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[GradCAMPlusPlusLogger(tmp_path / "gradcam", num_images=2)],
    )
    trainer.fit(tiny_classifier(), datamodule=TinyData())
    pids = calls.read_text().split()
    assert len(pids) == 2 and len(set(pids)) == 1  # one grid per validation, all from one process
    assert sorted(p.name for p in (tmp_path / "gradcam").glob("*.png")) == ["val-epoch000.png", "val-epoch001.png"]


def test_stage_callbacks_follow_the_config(tmp_path):
    run_info = {"fold": 2, "seed": 1, "init": "imagenet"}
    assert finetune_callbacks(FineTuneCVConfig(record_losses=False), run_info, tmp_path) == []
    config = FineTuneCVConfig(record_losses=True)
    config.gradcam = GradCAMConfig(enabled=True, num_images=2, target_layer="backbone.layer3")
    recorder, gradcam = finetune_callbacks(config, run_info, tmp_path)
    assert isinstance(recorder, PerSampleLossRecorder) and recorder.path == tmp_path / "losses.csv" and recorder.run_info == run_info
    assert isinstance(gradcam, GradCAMPlusPlusLogger) and gradcam.out_dir == tmp_path / "gradcam"
    assert (gradcam.num_images, gradcam.target_layer, gradcam.marker_config) == (2, "backbone.layer3", config.data.augment.markers)


def test_a_fine_tuning_process_imports_grad_cam_only_when_it_explains():
    # pytorch-grad-cam pulls in scikit-learn's decomposition (~0.4 s of every CV process's
    # start-up); tus.eval.explain imports it inside the functions that draw CAMs.
    code = "import sys, tus.stages.finetune_cv, tus.cli.finetune; print(' '.join(sys.modules))"
    modules = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    assert "tus.callbacks.gradcam" in modules
    assert "pytorch_grad_cam" not in modules and "sklearn.decomposition" not in modules
