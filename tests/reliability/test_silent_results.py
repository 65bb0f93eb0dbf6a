"""Runs that used to end with exit 0 and plausible numbers (issue 23): a NaN loss, a selection
of the first steps hidden behind "best epoch", a collapsed model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers import make_labeled_dataset
from tests.stages.test_finetune_cv import CPU_CONFIG
from tus.callbacks.finite_loss import NonFiniteLossError, StopOnNonFiniteLoss, resolve_max_nonfinite_steps
from tus.cli.main import main
from tus.eval.cv_summary import collapse_reason, render_summary_markdown


def cv_args(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(CPU_CONFIG),
        f"--data.manifest={manifest}",
        f"--output_root={out}",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--trainer.enable_progress_bar=false",
        "--seeds=[0]",
        "--logging.wandb=false",
        "--model.name=resnet10t",
        "--optim.schedule=constant",
        "--record_losses=false",
        "--trainer.channels_last=false",
        *extra,
    ]


def test_nan_loss_stops_the_cv_in_one_line_and_the_summary_marks_the_run_failed(tmp_path: Path, capsys):
    manifest = make_labeled_dataset(tmp_path / "data", patients=12)
    code = main(["finetune-cv", *cv_args(manifest, tmp_path / "runs", "--trainer.max_epochs=3", "--optim.lr_backbone=1e12", "--optim.lr_head=1e12")])

    printed = capsys.readouterr()
    lines = [line for line in printed.err.splitlines() if line.strip() and not line.startswith("precision:")]
    assert code == 1, printed
    assert len(lines) == 1 and "Traceback" not in printed.err, printed.err
    assert "fold0-seed0" in lines[0] and "training loss is NaN at step" in lines[0] and "learning rate is likely too high" in lines[0], lines[0]
    (run_dir,) = (tmp_path / "runs").iterdir()
    failed = json.loads((run_dir / "runs" / "fold0-seed0" / "failed.json").read_text())
    assert failed["step"] >= 1 and f"at step {failed['step']}" in lines[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["runs"] == 0 and [f["run"] for f in summary["failed"]] == ["fold0-seed0"]
    assert "**WARNING: fold0-seed0 FAILED**" in (run_dir / "summary.md").read_text()
    assert not (run_dir / "runs" / "fold0-seed0" / "metrics.json").exists()


class _Trainer:
    """What the callback reads of a Trainer."""

    world_size = 1
    global_step = 7
    current_epoch = 1
    precision_plugin = None
    optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)]


@pytest.mark.parametrize(
    ("max_consecutive", "losses", "stops_at"),
    [
        (0, [1.0, float("nan")], 1),
        (0, [1.0, float("inf")], 1),
        (2, [float("inf"), float("inf"), 1.0, float("inf"), float("inf"), float("inf")], 5),  # a finite loss resets the count
        (2, [float("nan"), float("nan"), 1.0], None),
    ],
)
def test_the_check_tolerates_exactly_the_configured_consecutive_non_finite_losses(max_consecutive, losses, stops_at):
    callback = StopOnNonFiniteLoss(max_consecutive)
    stopped = None
    for index, loss in enumerate(losses):
        try:
            callback.on_train_batch_end(_Trainer(), None, {"loss": torch.tensor(loss)}, None, index)
        except NonFiniteLossError as error:
            stopped = index
            assert "at step 7 (epoch 1)" in str(error) and "largest lr 0.5" in str(error)
            break
    assert stopped == stops_at


class _Scaler:
    def __init__(self, scales):
        self.scales = iter(scales)

    def is_enabled(self):
        return True

    def get_scale(self):
        return next(self.scales)


def test_steps_skipped_by_the_16_mixed_gradient_scaler_count_too():
    """A finite loss whose gradients always overflow: the scaler halves its scale at each skipped step."""
    trainer = _Trainer()
    scales = [65536.0, 32768.0, 16384.0, 16384.0, 8192.0, 4096.0, 2048.0]  # skipped: 1, 2, reset, 1, 2, 3
    trainer.precision_plugin = type("Plugin", (), {"scaler": _Scaler(scales)})()
    callback = StopOnNonFiniteLoss(2)
    with pytest.raises(NonFiniteLossError, match="overflowed in 3 consecutive steps under 16-mixed"):
        for index in range(len(scales)):
            callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0)}, None, index)
    assert index == 6


def test_auto_tolerance_is_for_16_mixed_only():
    assert resolve_max_nonfinite_steps("auto", "16-mixed") == 25
    assert resolve_max_nonfinite_steps("auto", "bf16-mixed") == 0
    assert resolve_max_nonfinite_steps("auto", "32-true") == 0
    assert resolve_max_nonfinite_steps(3, "32-true") == 3


def test_validation_every_batch_records_the_selected_step_and_epoch(tmp_path: Path):
    from tests.stages.test_finetune_cv import tiny_config
    from tus.stages.finetune_cv import run_cv

    manifest = make_labeled_dataset(tmp_path / "data", patients=30, per_patient=1)
    config = tiny_config(manifest, tmp_path / "runs", "selection=inner_val", "data.inner_val_fraction=0.25", "trainer.val_check_interval=1", "trainer.max_epochs=2", "record_losses=false")
    run_dir = run_cv(config)

    for fold_dir in sorted((run_dir / "runs").iterdir()):
        record = json.loads((fold_dir / "metrics.json").read_text())
        # Independently: the first step at which the logged validation AUROC reached its maximum
        # (ModelCheckpoint keeps the first of equal scores).
        log = pd.read_csv(fold_dir / "metrics.csv")
        val = log.dropna(subset=["val/auroc"])
        best = val.loc[val["val/auroc"].idxmax()]
        assert record["selected_step"] == int(best["step"]) + 1, (record, val[["step", "epoch", "val/auroc"]])
        assert record["selected_epoch"] == int(best["epoch"])
        assert record["steps"] == len(val)  # one validation after every training step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["run"] for s in summary["selected"]] == [p.name for p in sorted((run_dir / "runs").iterdir())]
    assert "Selected models (epoch, step of steps trained): fold0-seed0 (" in (run_dir / "summary.md").read_text()


def test_constant_predictions_or_a_validation_auroc_stuck_at_half_are_collapse(tmp_path: Path):
    varied = pd.DataFrame({"probability": [0.2, 0.7, 0.4], "label": [0, 1, 0]})
    constant = pd.DataFrame({"probability": [0.31, 0.31 + 1e-6, 0.31], "label": [0, 1, 0]})
    assert collapse_reason(varied, tmp_path / "none.csv") is None
    assert collapse_reason(constant, tmp_path / "none.csv") == "every test image gets probability 0.310 (constant predictions)"
    pd.DataFrame({"step": [0, 1, 2], "val/auroc": [0.5, None, 0.5]}).to_csv(tmp_path / "stuck.csv", index=False)
    pd.DataFrame({"step": [0, 1, 2], "val/auroc": [0.5, None, 0.61]}).to_csv(tmp_path / "moved.csv", index=False)
    assert collapse_reason(varied, tmp_path / "stuck.csv", "val/auroc") == "validation AUROC stayed at 0.5 at all 2 validations"
    assert collapse_reason(varied, tmp_path / "moved.csv", "val/auroc") is None
    assert collapse_reason(varied, tmp_path / "stuck.csv", None) is None  # no inner validation: nothing to read


def test_summary_md_shows_collapsed_runs_next_to_the_table():
    names = ["accuracy", "precision", "recall", "f1", "auroc"]
    stats = {n: {"mean": 0.5, "std": 0.0, "n": 2} for n in names}
    base = {"accuracy": 0.8, "precision": 0.0, "recall": 0.0, "f1": 0.0, "auroc": 0.5}
    summary = {
        "name": "cv",
        "folds": 2,
        "seeds": [0],
        "runs": 2,
        "expected_runs": 2,
        "metrics": stats,
        "baselines": {"positive_rate": 0.2, "always_negative": base, "prior_random": base},
        "selection": "last",
        "selection_note": "last",
        "collapsed": [{"run": "fold1-seed0", "reason": "every test image gets probability 0.500 (constant predictions)"}],
    }
    text = render_summary_markdown(summary)
    assert "**WARNING: 1 of 2 runs COLLAPSED**" in text and "fold1-seed0: every test image gets probability 0.500" in text


def test_a_run_saved_before_max_nonfinite_steps_existed_resumes_without_a_config_change(tmp_path: Path):
    import yaml

    from tus.config import ConfigError, load_config, save_config
    from tus.runs import check_config_change
    from tus.stages.finetune_cv import FineTuneCVConfig

    config = load_config(FineTuneCVConfig, "finetune/cpu", [])
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["trainer"]["max_nonfinite_steps"]  # as a tus before this option wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_config_change(tmp_path, config, allow=False)  # the new option at its default: not a change
    with pytest.raises(ConfigError, match=r"\(trainer.max_nonfinite_steps\)"):
        check_config_change(tmp_path, load_config(FineTuneCVConfig, "finetune/cpu", ["trainer.max_nonfinite_steps=3"]), allow=False)
