"""MAE as a pretraining method of the registry: run through the unchanged pretraining stage, export, reload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tus.config import ConfigError, load_config
from tus.data.phantom import generate_phantom
from tus.data.pools import PretrainDataConfig
from tus.losses.mae import mae_loss, patchify
from tus.methods import pretraining_method
from tus.methods.mae import MaskedAutoencoder, MaskedAutoencoderConfig, MaskedImageTransform, mask_seed, predict_mean_loss
from tus.models.backbones import BackboneConfig, create_backbone
from tus.models.vit import create_vit_from_export
from tus.stages.pretrain import PretrainConfig, run_pretraining

SIZE, PATCH, STEPS, BATCH = 32, 8, 4, 8


def tiny_config(**overrides) -> MaskedAutoencoderConfig:
    fields = {"image_size": SIZE, "patch_size": PATCH, "decoder_depth": 1, "decoder_embed_dim": 32, "decoder_num_heads": 2}
    return MaskedAutoencoderConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    """Four MAE steps through ``run_pretraining`` (the stage has no MAE-specific code)."""
    root = tmp_path_factory.mktemp("mae")
    phantom = generate_phantom(root / "phantom", num_patients=6, images_per_patient=(1, 2), image_size=SIZE, pool_size=40)
    overrides = [
        f"data.sources=[{{manifest: '{phantom.unlabeled_manifest}'}}]",
        f"output_root={root / 'runs'}",
        f"data.image_size={SIZE}",
        f"data.batch_size={BATCH}",
        f"method.image_size={SIZE}",
        f"method.patch_size={PATCH}",
        "method.decoder_depth=1",
        "method.decoder_embed_dim=32",
        "method.decoder_num_heads=2",
        "method.schedule.warmup_steps=2",
        "method.reconstruction_every_n_steps=2",
        "method.reconstruction_images=4",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "checkpoint_every_n_steps=2",
        "monitor.every_n_steps=2",
        "monitor.holdout_per_organ=4",
        "monitor.bank_per_organ=8",
        "logging.wandb=false",
    ]
    return run_pretraining(load_config(PretrainConfig, "pretrain/mae_cpu", overrides))


def test_registry_resolves_mae():
    assert pretraining_method("mae") is MaskedAutoencoder


def test_stage_run_logs_a_finite_mae_loss_and_the_probe(mae_run: Path):
    steps = pd.read_csv(mae_run / "metrics.csv").dropna(subset=["train/loss"])
    assert sorted(steps["step"]) == list(range(STEPS))
    assert np.isfinite(steps["train/loss"]).all()
    # train/loss is the MAE loss alone (the online organ probe's CE is logged apart).
    assert np.allclose(steps["train/loss"], steps["train/loss_mae"])
    assert np.isfinite(steps["train/loss_organ_probe"]).all()
    summary = json.loads((mae_run / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert [p["step"] for p in summary["probe"]] == [0, 2, 4]
    assert all(0.0 <= p["probe/knn_organ_acc"] <= 1.0 for p in summary["probe"])


def test_optimizer_is_adamw_with_scaled_lr_and_no_decay_on_norms_biases_tokens(mae_run: Path):
    checkpoint = torch.load(mae_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay", "organ_probe"}
    assert by_name["decay"]["weight_decay"] == 0.05 and by_name["no_decay"]["weight_decay"] == 0.0
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in groups)
    # lr = base_lr x global batch / 256 (mae_cpu: base_lr 1e-2), then the cosine schedule.
    peak = 1.0e-2 * BATCH / 256
    assert all(g["initial_lr"] == pytest.approx(peak) for g in groups)
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == STEPS
    # The encoder's weights are stored once (``encoder`` is a view of ``model.encoder``).
    assert not any(k.startswith("encoder.") for k in checkpoint["state_dict"])
    # Every trainable parameter is in one group; the fixed sin-cos position embedding is frozen, in none.
    module = MaskedAutoencoder(tiny_config(), num_organs=2, batch_size=BATCH)
    assert not module.encoder.pos_embed.requires_grad
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in module.parameters())


def test_export_rebuilds_the_trained_vit(mae_run: Path):
    meta = json.loads((mae_run / "encoder" / "config.json").read_text())
    assert meta["method"] == "mae" and meta["architecture"]["name"] == "vit_tiny_patch16_224" and meta["in_chans"] == 1
    # The architecture only: fc_norm (MAE pretraining keeps the final norm) is the fine-tuning head's choice.
    assert meta["architecture"]["kwargs"] == {"img_size": SIZE, "patch_size": PATCH, "in_chans": 1, "global_pool": "token"}
    loaded = create_vit_from_export(mae_run / "encoder").eval()
    checkpoint = torch.load(mae_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = MaskedAutoencoder(tiny_config(), num_organs=2, batch_size=BATCH)
    trained.load_state_dict(checkpoint["state_dict"])
    images = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        expected = trained.encoder.eval()(images)
        assert expected.shape == (3, 192)
        assert torch.equal(loaded(images), expected)
    # Fine-tuning as production builds it (finetune/vit.yaml: global_pool avg, drop path): MAE's head, the mean of
    # the patch tokens of the trained blocks, then a fresh fc_norm (the pretrained final norm is not used).
    backbone = BackboneConfig(name="vit_tiny_patch16_224", init="tus", weights=str(mae_run / "encoder" / "config.json"), global_pool="avg", drop_path_rate=0.1)
    avg = create_backbone(backbone).eval()
    assert avg.global_pool == "avg" and isinstance(avg.norm, torch.nn.Identity) and torch.equal(avg.fc_norm.weight, torch.ones(192))
    with torch.no_grad():
        tokens = trained.encoder.blocks(trained.encoder._pos_embed(trained.encoder.patch_embed(images)))
        torch.testing.assert_close(avg(images), torch.nn.functional.layer_norm(tokens[:, 1:].mean(dim=1), (192,), eps=1e-6), rtol=1e-5, atol=1e-5)


def test_reconstruction_grids_are_written_every_n_steps(mae_run: Path):
    written = sorted(p.name for p in (mae_run / "reconstructions").iterdir())
    assert written == ["step_0000002.png", "step_0000004.png"]
    width, height = Image.open(mae_run / "reconstructions" / written[-1]).size
    # 3 rows (original / masked / reconstruction) of 4 images, 2-px padding.
    assert (width, height) == (4 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)


def test_masks_keep_a_quarter_differ_per_image_and_step_and_replay_for_the_same_step():
    torch.manual_seed(0)
    module = MaskedAutoencoder(tiny_config(), num_organs=2, batch_size=4)
    images = torch.randn(6, 1, SIZE, SIZE)

    def masks(step: int, rank: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(mask_seed(0, rank, step, 0))
        return module.masked_forward(images, generator)["mask"]

    first = masks(5)
    assert (first.sum(dim=1) == 12).all()  # 16 patches, round(25 %) = 4 visible
    assert len({tuple(row.tolist()) for row in first}) == 6
    assert torch.equal(masks(5), first)  # a resumed run at step 5 draws the same masks
    assert not torch.equal(masks(6), first)
    assert not torch.equal(masks(5, rank=1), first)


def test_training_loss_is_the_masked_mse_and_the_probe_gets_no_encoder_gradient():
    torch.manual_seed(0)
    module = MaskedAutoencoder(tiny_config(), num_organs=2, batch_size=4)
    images, organs = torch.randn(4, 1, SIZE, SIZE), torch.tensor([0, 1, 1, 0])
    results = module.compute_losses(images, organs, torch.Generator().manual_seed(3))
    out = module.masked_forward(images, torch.Generator().manual_seed(3))
    expected = mae_loss(out["pred"], patchify(images, PATCH), out["mask"], norm_pix_loss=True)
    assert torch.allclose(results["loss_mae"], expected)
    assert torch.allclose(results["loss"], expected + results["loss_organ_probe"])
    # The probe's CE adds nothing to the encoder's gradient (its input is detached), only to the probe's.
    module.zero_grad()
    results["loss"].backward()
    with_probe = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    assert module.organ_head.weight.grad.abs().sum() > 0
    module.zero_grad()
    expected.backward()
    alone = {n: p.grad for n, p in module.model.named_parameters() if p.grad is not None}
    assert with_probe.keys() == alone.keys() and "encoder.patch_embed.proj.weight" in alone
    assert all(torch.allclose(with_probe[n], alone[n]) for n in alone)


def test_reconstruction_keeps_visible_patches_and_greys_masked_ones():
    torch.manual_seed(0)
    module = MaskedAutoencoder(tiny_config(), num_organs=1, batch_size=4)
    images = torch.randn(2, 1, SIZE, SIZE)
    rows = module.reconstruct(images, seed=1)
    mask = module.masked_forward(images, torch.Generator().manual_seed(1))["mask"].bool()
    original, masked, recon = (patchify(rows[k], PATCH) for k in ("original", "masked", "reconstruction"))
    assert torch.equal(original, patchify(images, PATCH))
    assert torch.equal(masked[mask], torch.zeros_like(masked[mask]))
    assert torch.equal(recon[~mask], original[~mask])
    # Masked patches get the de-normalised prediction: each patch's own mean and std put back.
    target = original[mask]
    pred = module.masked_forward(images, torch.Generator().manual_seed(1))["pred"].detach()[mask]
    expected = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
    assert torch.allclose(recon[mask], expected, atol=1e-5)


def test_transform_gives_one_reproducible_view_and_checks_the_size():
    image = np.random.default_rng(0).integers(0, 255, size=(48, 48), dtype=np.uint8)
    transform = MaskedAutoencoder.train_transform(tiny_config(), PretrainDataConfig(image_size=SIZE), seed=3)
    assert isinstance(transform, MaskedImageTransform)
    first = transform(image)
    assert first.shape == (1, SIZE, SIZE) and first.dtype == torch.float32
    transform.reseed(3)
    assert torch.equal(transform(image), first)
    transform.set_rank(1)
    assert not torch.equal(transform(image), first)
    with pytest.raises(ConfigError, match="must equal data.image_size"):
        MaskedAutoencoder.train_transform(tiny_config(), PretrainDataConfig(image_size=64), seed=0)


def test_predict_mean_baseline_matches_a_hand_computation():
    images = torch.rand(2, 1, 16, 16)
    patches = images.reshape(2, 2, 8, 2, 8).permute(0, 1, 3, 2, 4).reshape(2, 4, 64).double().numpy()
    normalised = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    assert predict_mean_loss(images, 8) == pytest.approx(float((normalised**2).mean()), rel=1e-5)
    raw = float(((patches - patches.mean()) ** 2).mean())
    assert predict_mean_loss(images, 8, norm_pix_loss=False) == pytest.approx(raw, rel=1e-5)
