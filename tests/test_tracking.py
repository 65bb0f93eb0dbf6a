"""W&B as the comparison dashboard: a tiny pretrain -> fine-tune chain, run offline, leaves the
artifacts, their lineage and the CV summary run's table in its run folders (read back from the
offline transaction logs, not from tus' own bookkeeping)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import finished_wandb_records, make_labeled_dataset
from tests.stages.test_pretrain import REPO, cli_overrides, make_pool
from tus import tracking


def records_by_kind(run_dir: Path) -> dict[str, list]:
    found: dict[str, list] = {}
    for record in finished_wandb_records(run_dir):
        found.setdefault(record.WhichOneof("record_type"), []).append(record)
    return found


@pytest.mark.slow
def test_pretrain_to_finetune_chain_leaves_artifacts_lineage_and_a_summary_table(tmp_path, monkeypatch):
    from tus.cli.pretrain import main as pretrain_main
    from tus.config import load_config
    from tus.stages.finetune_cv import FineTuneCVConfig, run_cv

    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [o for o in cli_overrides(make_pool(tmp_path / "pool"), tmp_path / "runs") if o != "logging.wandb=false"]
    assert pretrain_main(["--config", str(REPO / "experiments/pretrain/cpu.yaml"), *overrides, "trainer.precision=32-true", "--name=enc"]) == 0
    (pretrain_dir,) = (tmp_path / "runs").iterdir()
    manifest = make_labeled_dataset(tmp_path / "labeled", patients=8)
    config = load_config(
        FineTuneCVConfig,
        REPO / "experiments" / "finetune" / "cpu.yaml",
        [
            f"data.manifest={manifest}",
            f"output_root={tmp_path / 'cv'}",
            "data.image_size=32",
            "data.batch_size=8",
            "data.num_folds=2",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "seeds=[0, 1]",
            "model.name=test_resnet",
            "model.init=tus",
            f"model.weights={pretrain_dir / 'encoder'}",
            "optim.schedule=constant",
            "logging.group=chain",
        ],
    )
    cv_dir = run_cv(config)

    # The pretraining run logged its encoder; the CV's runs logged each fold model and the predictions.
    logged = {r.artifact.name: r.artifact for r in records_by_kind(pretrain_dir)["artifact"]}
    encoder = logged[f"encoder-{pretrain_dir.name}"]
    assert encoder.type == "model" and {m.path for m in encoder.manifest.contents} >= {"model.safetensors", "config.json"}
    cv_records = records_by_kind(cv_dir)
    cv_artifacts = {r.artifact.name: r.artifact for r in cv_records["artifact"]}
    assert {f"model-{cv_dir.name}-fold{f}-seed{s}" for f in (0, 1) for s in (0, 1)} <= set(cv_artifacts)
    predictions = cv_artifacts[f"predictions-{cv_dir.name}"]
    assert sorted(m.path for m in predictions.manifest.contents) == sorted(f"fold{f}-seed{s}/predictions.csv" for f in (0, 1) for s in (0, 1))

    # Lineage: the CV summary run used the very encoder the pretraining run logged (same digest).
    used = [row for row in tracking.read_lineage(cv_dir) if row["direction"] == "use"]
    assert {row["name"] for row in used} == {f"encoder-{pretrain_dir.name}", f"labels-{tracking.content_hash([manifest])}"}
    assert next(row for row in used if row["type"] == "model")["digest"] == encoder.digest
    assert any(row["direction"] == "use" and row["name"].startswith("pool-") for row in tracking.read_lineage(pretrain_dir))

    # Every run is grouped and typed; the fine-tuning runs carry the encoder's provenance.
    runs = {r.run.job_type: r.run for r in cv_records["run"]}
    assert set(runs) == {"finetune", "cv-summary"} and {r.run.run_group for r in cv_records["run"]} == {"chain"}
    config_items = {item.key: json.loads(item.value_json) for item in runs["finetune"].config.update}
    assert config_items["provenance"] == {"init": "tus", "encoder_run": pretrain_dir.name, "encoder_method": "simclr_organ", "encoder_steps": 2}

    # The summary run's table has one row per fold x seed, and its summary the CV's numbers.
    (table_file,) = cv_dir.glob("wandb/offline-run-*/files/media/table/runs_*.table.json")
    table = json.loads(table_file.read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted((r["fold"], r["seed"]) for r in rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    summary = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for record in cv_records["summary"] for item in record.summary.update}
    expected = json.loads((cv_dir / "summary.json").read_text())
    assert summary["auroc/mean"] == pytest.approx(expected["metrics"]["auroc"]["mean"])
    assert summary["auroc/ci_low"] == pytest.approx(expected["ci"]["auroc"]["low"])
    logged = {item.key or item.nested_key[0] for record in cv_records["history"] for item in record.history.item}
    assert {"roc_table", "pr_table", "confusion_table", "runs", "figures/roc"} <= logged


def test_export_dry_run_lists_offline_runs_and_the_uses_to_replay(tmp_path, monkeypatch):
    from tus.runs import LoggingConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\na.png,0\n")
    run = tracking.start_run(tmp_path, LoggingConfig(group="g"), name="summary", job_type="cv-summary")
    tracking.use_artifact(run, tmp_path, tracking.file_artifact("labels-abc", "dataset", [manifest]))
    run.finish()
    folders = tracking.offline_run_folders([tmp_path])
    assert folders == [Path(run.dir).parent], f"the offline run went to {run.dir} (mode {run.settings.mode})"
    (folder,) = folders
    assert tracking.export_offline([tmp_path], dry_run=True) == [f"sync {folder}", f"use labels-abc:latest (dataset) in run tus/{run.id}"]
    (run_record,) = [r.run for r in finished_wandb_records(tmp_path) if r.WhichOneof("record_type") == "run"]
    assert (run_record.run_group, run_record.job_type) == ("g", "cv-summary")


def test_nothing_is_tracked_when_wandb_is_disabled(tmp_path, monkeypatch):
    from tus.runs import LoggingConfig

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.start_run(tmp_path, LoggingConfig(), name="x", job_type="cv-summary") is None
    tracking.track_study(tmp_path, LoggingConfig(), name="s")
    assert list(tmp_path.iterdir()) == []
