"""Strict configs: composition, overrides, and errors naming the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
    with pytest.raises(ConfigError, match=r"unknown option 'data.augment.rotation'"):
        load_config(FineTuneCVConfig, None, ["data.augment.rotation=10"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError, match="'trainer.max_epoch'"):
        load_config(FineTuneCVConfig, bad)


def test_wrong_types_and_literals_are_refused():
    with pytest.raises(ConfigError, match="data.batch_size: expected int, got 'big'"):
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


def test_one_batch_means_one_batch_and_every_trainer_option_exists():
    from tus.runs import trainer_options

    config = load_config(FineTuneCVConfig, "finetune/cpu", ["--trainer.limit_train_batches=1", "--trainer.val_check_interval=1", "--trainer.fast_dev_run=true"])
    assert config.trainer.limit_train_batches == 1 and isinstance(config.trainer.limit_train_batches, int)
    options = trainer_options(config.trainer)
    assert options["limit_train_batches"] == 1 and type(options["limit_train_batches"]) is int
    assert options["fast_dev_run"] is True and options["precision"] in ("32-true", "bf16-mixed", "16-mixed")


def test_string_options_stay_strings_and_lists_are_replaced():
    config = load_config(FineTuneCVConfig, "finetune/cpu", ["--name=no", "--init_label=0123", "--seeds=[7]"])
    assert (config.name, config.init_label, config.seeds) == ("no", "0123", [7])


def test_packaged_configs_resolve_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    assert load_config(FineTuneCVConfig, "finetune/cpu").data.image_size == 64
    result = subprocess.run(
        [sys.executable, "-m", "tus.cli", "finetune-cv", "--config", "finetune/cpu", "--data.manifest=x.csv", "--print_config"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["data"]["manifest"] == "x.csv" and printed["trainer"]["precision"] == "auto"
    assert not list(tmp_path.iterdir())  # printing a config writes nothing


def test_base_cycles_and_yaml_errors_name_the_file(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(FineTuneCVConfig, tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("data:\n  image_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(FineTuneCVConfig, tmp_path / "bad.yaml")


@pytest.mark.slow
def test_limit_train_batches_one_trains_one_batch_per_epoch(labeled_manifest: Path, tmp_path: Path):
    import pandas as pd

    from tests.stages.test_finetune_cv import tiny_config
    from tus.stages.finetune_cv import run_cv

    config = tiny_config(labeled_manifest, tmp_path / "runs", "--trainer.max_epochs=3", "--trainer.limit_train_batches=1", "--data.num_folds=2")
    run_dir = run_cv(config)
    losses = pd.read_csv(run_dir / "runs" / "fold0-seed0" / "losses.csv")
    assert sorted(losses["step"].unique()) == [0, 1, 2]  # one optimizer step in each of 3 epochs
    assert losses.groupby("step").size().max() <= config.data.batch_size


@pytest.mark.parametrize(
    "override, message",
    [
        ("--data.image_size=0", "data.image_size must be >= 1, got 0"),
        ("--data.batch_size=-4", "data.batch_size must be >= 1, got -4"),
        ("--data.num_folds=1", "data.num_folds must be >= 2, got 1"),
        ("--trainer.checkpoint_interval_s=-1", r"trainer.checkpoint_interval_s must be >= 0, got -1.0"),
        ("--seeds=[]", None),  # refused when the CV starts (see test_cv), not by the schema
    ],
)
def test_out_of_range_values_fail_naming_the_key(override: str, message: str | None):
    if message is None:
        assert load_config(FineTuneCVConfig, "finetune/cpu", [override]).seeds == []
        return
    with pytest.raises(ConfigError, match=message):
        load_config(FineTuneCVConfig, "finetune/cpu", [override])
