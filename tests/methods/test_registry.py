"""The pretraining registry: methods by name, and a user's own class plugged in by class path
through the unchanged pretraining stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tus.config import ConfigError, load_config
from tus.data.phantom import generate_phantom
from tus.data.transforms import eval_transform
from tus.methods import PRETRAINING_METHODS, pretraining_method
from tus.methods.base import PretrainingMethod
from tus.methods.simclr_organ import SimCLROrgan
from tus.stages.pretrain import PretrainConfig, run_pretraining


@dataclass
class ToyConfig:
    width: int = 4
    lr: float = 0.1


class ToyMethod(PretrainingMethod):
    """A method no tus file knows: shrink the features of one view towards zero."""

    Config = ToyConfig

    def __init__(self, config: ToyConfig, *, num_organs: int, batch_size: int):
        super().__init__()
        self.config = config
        self.encoder = nn.Sequential(nn.Conv2d(1, config.width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.seen_batches = 0

    @classmethod
    def train_transform(cls, config: ToyConfig, data, seed: int):
        return eval_transform()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen_batches += 1
        loss = self.encoder(batch["image"]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.config.lr)

    def export_encoder(self, path: Path, extra: dict) -> None:
        save_file(self.encoder.state_dict(), str(path.with_suffix(".safetensors")))


def test_registry_names_resolve_and_unknown_names_fail():
    assert pretraining_method("simclr_organ") is SimCLROrgan
    assert set(PRETRAINING_METHODS) >= {"simclr_organ", "mae"}
    with pytest.raises(ConfigError, match="unknown pretraining method 'byol'"):
        pretraining_method("byol")
    with pytest.raises(ConfigError, match="not a tus.methods.base.PretrainingMethod"):
        pretraining_method("torch.nn.Linear")


def test_method_options_are_checked_against_the_methods_own_schema():
    name = f"{__name__}.ToyMethod"
    config = load_config(PretrainConfig, "pretrain/cpu", [f"--method={{name: {name}}}", "--method.width=8"])
    assert config.method == {"name": name, "width": 8, "lr": 0.1}
    with pytest.raises(ConfigError, match="method.depth"):
        load_config(PretrainConfig, "pretrain/cpu", [f"--method={{name: {name}}}", "--method.depth=2"])
    with pytest.raises(ConfigError, match="method.width"):
        load_config(PretrainConfig, "pretrain/cpu", [f"--method={{name: {name}}}", "--method.width=wide"])


@pytest.mark.slow
def test_a_users_method_runs_through_the_unchanged_pretraining_stage(tmp_path: Path):
    pool = generate_phantom(tmp_path / "phantom", num_patients=4, image_size=32, pool_size=24).unlabeled_manifest
    config = load_config(
        PretrainConfig,
        "pretrain/cpu",
        [
            f"--method={{name: {__name__}.ToyMethod, width: 3}}",
            f"--data.sources=[{{manifest: '{pool}'}}]",
            "--data.image_size=32",
            "--data.batch_size=4",
            "--trainer.max_steps=3",
            "--trainer.enable_progress_bar=false",
            "--monitor.every_n_steps=0",
            "--monitor.holdout_per_organ=0",
            "--checkpoint_every_n_steps=null",
            f"--output_root={tmp_path / 'runs'}",
        ],
    )
    run_dir = run_pretraining(config)
    weights = load_file(str(run_dir / "encoder.safetensors"))
    assert weights["0.weight"].shape == (3, 1, 3, 3)
    assert (run_dir / "config.yaml").read_text().count("ToyMethod") == 1
