"""The diffusion U-Net config, training (loss falls, exact resume), EMA and exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tus.cli.diffusion import main
from tus.config import ConfigError, load_config
from tus.data.images import write_grayscale
from tus.data.pools import EpochWeightedSampler
from tus.losses.gaussian_diffusion import NoiseSchedule, hybrid_loss, q_sample
from tus.methods.iddpm import (
    DiffusionCheckpointError,
    DiffusionModule,
    EmaConfig,
    OptimConfig,
    ProcessConfig,
    UNetConfig,
    build_unet,
    latest_export,
    load_ema_from_checkpoint,
    load_unet_export,
)
from tus.models.export import load_export
from tus.stages.diffusion import DiffusionConfig, run_diffusion

REPO = Path(__file__).resolve().parents[2]
TINY_UNET = UNetConfig(
    sample_size=16,
    base_channels=16,
    channel_mults=(1, 2),
    layers_per_block=1,
    attention_resolutions=(8,),
    attention_head_dim=16,
    norm_num_groups=8,
)


def disk_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Bright disks at random places on a dark background, uint8 (count, size, size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = []
    for _ in range(count):
        cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
        radius = size / 5
        images.append(np.where((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2, 220, 30).astype(np.uint8))
    return np.stack(images)


def disk_manifest(root: Path, count: int = 12, size: int = 16) -> Path:
    rows = []
    for i, image in enumerate(disk_images(count, size)):
        write_grayscale(root / f"img{i:02d}.png", image)
        rows.append({"path": f"img{i:02d}.png", "patient_id": f"p{i}", "label": i % 2})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def test_reference_unet_config_is_the_papers():
    config = UNetConfig().diffusers_config()
    assert config["block_out_channels"] == (128, 128, 256, 256, 512, 512)
    assert config["down_block_types"] == ("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 2
    assert config["up_block_types"] == ("AttnUpBlock2D",) * 2 + ("UpBlock2D",) * 4
    assert config["resnet_time_scale_shift"] == "scale_shift"
    assert (config["in_channels"], config["out_channels"], config["sample_size"], config["layers_per_block"]) == (1, 2, 256, 2)
    # 512 / 128 = 4 heads (improved-diffusion's num_heads).
    assert config["attention_head_dim"] == 128


def test_tiny_unet_layout_and_config_errors():
    unet = build_unet(TINY_UNET)
    output = unet(torch.zeros(2, 1, 16, 16), torch.tensor([0, 999])).sample
    assert output.shape == (2, 2, 16, 16)
    assert hasattr(unet.down_blocks[1], "attentions") and not hasattr(unet.down_blocks[0], "attentions")
    assert unet.mid_block.attentions[0].group_norm is not None
    assert unet.down_blocks[0].resnets[0].time_emb_proj.out_features == 2 * 16  # scale and shift
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetConfig(sample_size=16, channel_mults=(1, 2), attention_resolutions=(4,)).diffusers_config()
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetConfig(sample_size=16, base_channels=12, channel_mults=(1, 2), attention_resolutions=(8,), norm_num_groups=8).diffusers_config()


def test_hybrid_loss_of_a_tiny_model_falls_on_toy_images():
    torch.manual_seed(0)
    unet = build_unet(TINY_UNET)
    schedule = NoiseSchedule.cosine(1000)
    data = torch.from_numpy(disk_images(16, 16)).float().div(127.5).sub(1)[:, None]
    generator = torch.Generator().manual_seed(1)
    t_eval = torch.linspace(0, 999, 16).long()
    noise_eval = torch.randn(data.shape, generator=generator)

    def held_out_terms():
        with torch.no_grad():
            xt = q_sample(schedule, data, t_eval, noise_eval)
            terms = hybrid_loss(schedule, unet(xt, t_eval).sample, data, xt, t_eval, noise_eval)
        return terms.loss.mean().item(), terms.mse.mean().item(), terms.vlb.mean().item()

    before = held_out_terms()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    for _ in range(60):
        x0 = data[torch.randint(0, 16, (8,), generator=generator)]
        t = torch.randint(0, 1000, (8,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        xt = q_sample(schedule, x0, t, noise)
        loss = hybrid_loss(schedule, unet(xt, t).sample, x0, xt, t, noise).loss.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_terms()
    assert after[0] < 0.2 * before[0]
    assert after[1] < 0.5 * before[1]  # the noise prediction (L_simple) learned
    assert after[2] < 0.2 * before[2]  # the variance (L_vlb) learned


def tiny_config(tmp_path: Path, manifest: Path, **overrides) -> DiffusionConfig:
    values = [
        f"data.sources=[{{manifest: {manifest}}}]",
        f"output_root={tmp_path / 'runs'}",
        "data.image_size=16",
        "data.batch_size=4",
        "data.steps_per_epoch=3",
        "data.num_workers=0",
        "unet.sample_size=16",
        "unet.base_channels=16",
        "unet.channel_mults=[1, 2]",
        "unet.attention_resolutions=[8]",
        "unet.attention_head_dim=16",
        "samples.every_n_steps=0",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "logging.wandb=false",
        "optim.lr=1e-3",
        "ema.decay=0.9",
        *[f"{k}={v}" for k, v in overrides.items()],
    ]
    return load_config(DiffusionConfig, REPO / "experiments" / "diffusion" / "cpu.yaml", values)


def logged_losses(run_dir: Path) -> pd.Series:
    metrics = pd.read_csv(run_dir / "metrics.csv")  # a resumed run appends to it
    return metrics.dropna(subset=["train/loss"]).set_index("step")["train/loss"]


def test_resumed_training_repeats_the_uninterrupted_run(tmp_path):
    manifest = disk_manifest(tmp_path / "data")
    straight = run_diffusion(tiny_config(tmp_path, manifest))
    interrupted = run_diffusion(tiny_config(tmp_path, manifest, **{"trainer.max_steps": 3}))
    assert load_export(latest_export(interrupted))[1]  # a finished (3-step) run exports too
    # Extending the budget changes the config: refused unless allowed, then recorded.
    with pytest.raises(ConfigError, match=r"\(trainer.max_steps\)"):
        main(["--resume", str(interrupted), "trainer.max_steps=6"])
    assert main(["--resume", str(interrupted), "--allow-config-change", "--trainer.max_steps=6"]) == 0
    resumed = interrupted
    assert load_config(DiffusionConfig, resumed / "config.yaml").trainer.max_steps == 6
    changes = yaml.safe_load((resumed / "config_changes.yaml").read_text())
    assert changes[0]["changes"] == {"trainer.max_steps": {"was": 3, "now": 6}}
    # Resuming a finished run again trains nothing and keeps its config and export.
    assert main(["--resume", str(resumed)]) == 0
    assert len(yaml.safe_load((resumed / "config_changes.yaml").read_text())) == 1

    straight_losses, resumed_losses = logged_losses(straight), logged_losses(resumed)
    assert list(straight_losses.index) == list(range(6)) == list(resumed_losses.index)
    np.testing.assert_allclose(resumed_losses.to_numpy(), straight_losses.to_numpy(), rtol=1e-5)
    assert straight_losses.iloc[:3].tolist() != straight_losses.iloc[3:].tolist()

    straight_export, resumed_export = latest_export(straight), latest_export(resumed)
    assert straight_export.name == resumed_export.name == "ema_unet_step0000006"
    straight_weights, resumed_weights = load_export(straight_export)[1], load_export(resumed_export)[1]
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6)

    # The export is the EMA of the checkpoint, which differs from the raw weights.
    checkpoint = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 6
    ema_unet, export = load_ema_from_checkpoint(resumed / "checkpoints" / "last.ckpt")
    exported_unet, exported = load_unet_export(resumed_export)
    assert exported.step == export.step == 6 and exported.unet == export.unet
    for (_name, ema_tensor), exported_tensor in zip(ema_unet.state_dict().items(), exported_unet.state_dict().values()):
        torch.testing.assert_close(exported_tensor, ema_tensor)
    raw = checkpoint["state_dict"]["unet.conv_in.weight"]
    assert not torch.allclose(raw, ema_unet.conv_in.weight)


def test_ema_follows_the_weights_with_its_decay():
    module = DiffusionModule(TINY_UNET, ProcessConfig(), OptimConfig(), EmaConfig(decay=0.9))
    ema_before = module.ema.module.conv_in.weight.clone()
    with torch.no_grad():
        module.unet.conv_in.weight.add_(1.0)
    module.ema.update(module.unet, step=10)
    torch.testing.assert_close(module.ema.module.conv_in.weight, ema_before + 0.1)
    assert not any(p.requires_grad for p in module.ema.parameters())


def test_ema_builds_on_a_timm_without_stochastic_rounding(monkeypatch):
    # The H200 image's timm 1.0 predates ModelEmaV3(stochastic_rounding=...); its EMA of a
    # float32 model is the same plain lerp, so the module must build and average alike there.
    import timm.utils

    def old_init(self, model, decay=0.9999, use_warmup=False, **options):  # no stochastic_rounding
        if "stochastic_rounding" in options:
            raise TypeError("ModelEmaV3.__init__() got an unexpected keyword argument 'stochastic_rounding'")
        newest_init(self, model, decay=decay, use_warmup=use_warmup, **options)

    newest_init = timm.utils.ModelEmaV3.__init__
    monkeypatch.setattr(timm.utils.ModelEmaV3, "__init__", old_init)
    module = DiffusionModule(TINY_UNET, ProcessConfig(), OptimConfig(), EmaConfig(decay=0.75))
    ema_before = module.ema.module.conv_in.weight.clone()
    with torch.no_grad():
        module.unet.conv_in.weight.mul_(3.0)
    module.ema.update(module.unet, step=10)
    expected = 0.75 * ema_before + 0.25 * module.unet.conv_in.weight
    torch.testing.assert_close(module.ema.module.conv_in.weight, expected)


def test_loss_aware_sampler_state_travels_in_the_checkpoint():
    module = DiffusionModule(TINY_UNET, ProcessConfig(num_timesteps=4, timestep_sampler="loss_aware"), OptimConfig(), EmaConfig())
    module.timestep_sampler.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0]))
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    fresh = DiffusionModule(TINY_UNET, ProcessConfig(num_timesteps=4, timestep_sampler="loss_aware"), OptimConfig(), EmaConfig())
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.timestep_sampler.counts.tolist() == [1, 1, 1, 0]


def test_epoch_sampler_redraws_per_epoch_and_splits_ranks():
    weights = np.full(10, 0.1)
    draws = {rank: [] for rank in range(2)}
    for rank in range(2):
        sampler = EpochWeightedSampler(list(range(10)), weights, samples_per_rank=8, seed=3, num_replicas=2, rank=rank)
        for epoch in (0, 1, 0):
            sampler.set_epoch(epoch)
            draws[rank].append(list(sampler))
    assert draws[0][0] == draws[0][2] and draws[0][0] != draws[0][1]
    assert len(draws[0][0]) == 8 and draws[0][0] != draws[1][0]


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(DiffusionCheckpointError, match="not found"):
        load_unet_export(tmp_path / "nothing.safetensors")
    not_diffusion = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, not_diffusion)
    with pytest.raises(DiffusionCheckpointError, match="not a DiffusionModule checkpoint"):
        load_ema_from_checkpoint(not_diffusion)
