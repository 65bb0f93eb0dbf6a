"""Strict configs: composition, overrides, and errors naming the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tus.config import ConfigError, load_config, save_config, to_dict
from tus.stages.finetune_cv import FineTuneCVConfig

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_base_composition_and_overrides():
    config = load_config(FineTuneCVConfig, EXPERIMENTS / "finetune" / "cpu.yaml", ["optim.lr_head=1e-2", "seeds=[5, 6]", "data.augment.markers_p=0"])
    assert config.data.image_size == 64  # from cpu.yaml
    assert config.data.num_folds == 3  # inherited from paper.yaml
    assert config.optim.lr_head == pytest.approx(0.01)  # "1e-2" read as a float
    assert config.seeds == [5, 6]
    assert config.data.augment.markers_p == 0.0 and config.data.augment.rotate_limit == 15.0


def test_unknown_key_names_its_dotted_path(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'data.augment.rotation'"):
        load_config(FineTuneCVConfig, None, ["data.augment.rotation=10"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError, match="'trainer.max_epoch'"):
        load_config(FineTuneCVConfig, bad)


def test_wrong_types_and_literals_are_refused():
    with pytest.raises(ConfigError, match="data.batch_size: expected an integer"):
        load_config(FineTuneCVConfig, None, ["data.batch_size=big"])
    with pytest.raises(ConfigError, match="selection"):
        load_config(FineTuneCVConfig, None, ["selection=best_test"])
    with pytest.raises(ConfigError, match="model.init"):
        load_config(FineTuneCVConfig, None, ["model.init=imagenet21k"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(FineTuneCVConfig, None, ["seeds"])


def test_saved_config_reloads_identically(tmp_path: Path):
    config = load_config(FineTuneCVConfig, EXPERIMENTS / "finetune" / "cpu.yaml", ["name=x"])
    path = save_config(config, tmp_path / "config.yaml")
    assert to_dict(load_config(FineTuneCVConfig, path)) == to_dict(config)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(FineTuneCVConfig, "nope.yaml")
