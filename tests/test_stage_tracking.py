"""Every stage logs to W&B, not only training: ``sample``, ``filter``, ``noisy-labels`` and
``explain`` each leave an offline run (grouped, typed by stage) whose artifacts chain up with the
earlier stages' (same name and digest), read back from the offline transaction logs. Small
models (a 2-step diffusion run) and a handful of 16-32 px images."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.eval.test_synthetic_metrics import PixelExtractor
from tests.helpers import finished_wandb_records
from tus import tracking
from tus.data.images import list_images, write_grayscale


def offline_runs(folder: Path) -> dict[str, dict]:
    """Per job type: the run record, the artifacts it logged (name -> record) and history keys."""
    found: dict[str, dict] = {}
    current = None
    for record in finished_wandb_records(folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            current = found.setdefault(record.run.job_type, {"run": record.run, "artifacts": {}, "history": set(), "summary": {}})
        elif current is not None and kind == "artifact":
            current["artifacts"][record.artifact.name] = record.artifact
        elif current is not None and kind == "history":
            current["history"] |= {key for item in record.history.item if not (key := item.key or item.nested_key[0]).startswith("_")}
        elif current is not None and kind == "summary":
            current["summary"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update})
    return found


def uses(folder: Path) -> dict[str, dict]:
    return {row["name"]: row for row in tracking.read_lineage(folder) if row["direction"] == "use"}


def wandb_digest(name: str, kind: str, files: dict[str, Path]) -> str:
    """The digest W&B itself gives an artifact of these files (the reference the stages must match)."""
    import wandb

    artifact = wandb.Artifact(name, type=kind)
    for entry, path in files.items():
        artifact.add_file(str(path), name=entry)
    return artifact.digest


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_RUN_GROUP", "stages")


def test_diffusion_sample_filter_chain_logs_and_uses_the_same_artifacts(tmp_path, offline):
    from tests.methods.test_iddpm import disk_manifest, tiny_config
    from tus.methods.iddpm import latest_export
    from tus.stages.diffusion import run_diffusion
    from tus.stages.sample import generate
    from tus.stages.synthetic import run_filter

    # A 2-step diffusion run (W&B on) exports its EMA U-Net and logs it.
    diffusion_dir = run_diffusion(tiny_config(tmp_path, disk_manifest(tmp_path / "data"), **{"logging.wandb": "true", "trainer.max_steps": 2, "name": "diffusion-run"}))
    export = latest_export(diffusion_dir)
    assert export is not None

    samples = tmp_path / "samples"
    generate(export, samples, 4, sampler="ddim", steps=2, batch_size=4, device="cpu", progress=False)
    real = tmp_path / "real"
    real.mkdir()
    for image in list_images(samples)[:3]:
        shutil.copy(image, real / image.name)
    pd.DataFrame({"path": [f"real/{p.name}" for p in list_images(real)]}).to_csv(tmp_path / "real.csv", index=False)
    report = run_filter(tmp_path / "real.csv", samples, tmp_path / "filtered", k=1, link="copy", extractor=PixelExtractor())

    # The diffusion run logged its export; the sample run used it (same digest) and logged the folder.
    assert {r.run.job_type for r in finished_wandb_records(diffusion_dir) if r.WhichOneof("record_type") == "run"} == {"diffusion"}  # training and export alike
    diffusion = offline_runs(diffusion_dir)["diffusion"]
    model = diffusion["artifacts"][f"diffusion-{diffusion_dir.name}"]
    assert {m.path for m in model.manifest.contents} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert model.digest == wandb_digest("x", "model", {p.name: p for p in export.iterdir()})
    sample_run = offline_runs(samples)["sample"]
    assert sample_run["run"].run_group == "stages"
    (sample_name,) = sample_run["artifacts"]
    sample_artifact = sample_run["artifacts"][sample_name]
    expected = {p.name: p for p in [*list_images(samples), samples / "manifest.csv", samples / "sampling.json"]}
    assert sorted(m.path for m in sample_artifact.manifest.contents) == sorted(expected) and len(list_images(samples)) == 4
    assert sample_artifact.digest == wandb_digest("x", "dataset", expected)
    assert {name: (row["type"], row["digest"]) for name, row in uses(samples).items()} == {f"diffusion-{diffusion_dir.name}": ("model", model.digest)}
    assert sample_run["summary"]["images"] == 4

    # The filter used that very sample artifact and logged the kept set (its images and tables).
    filter_run = offline_runs(tmp_path / "filtered")["filter"]
    assert uses(tmp_path / "filtered")[sample_name]["digest"] == sample_artifact.digest
    (kept,) = filter_run["artifacts"].values()
    kept_images = sorted(p.name for p in list_images(tmp_path / "filtered" / "images"))
    assert len(kept_images) == report["kept"] > 0
    assert sorted(m.path for m in kept.manifest.contents) == sorted([*(f"images/{name}" for name in kept_images), "manifest.csv", "filter.csv", "filter.json"])
    assert sorted(pd.read_csv(tmp_path / "filtered" / "manifest.csv")["path"]) == sorted(f"images/{name}" for name in kept_images)  # as the artifact holds them
    assert (filter_run["summary"]["kept"], filter_run["summary"]["rejected"]) == (report["kept"], report["rejected"])


def test_noisy_labels_and_explain_runs_log_their_tables_and_images(tmp_path, offline):
    from tests.callbacks.test_gradcam import tiny_classifier
    from tests.helpers import make_labeled_dataset
    from tus.data.manifest import load_manifest
    from tus.eval.noisy_labels import FlaggingRule, write_report
    from tus.methods.classifier import save_finetuned
    from tus.stages.explain import run_explain

    manifest = make_labeled_dataset(tmp_path / "labeled", patients=4, per_patient=1)
    frame = load_manifest(manifest, require_labels=True, decode_images=False)
    sample_ids = frame["sample_id"]
    # Sample 0 exceeds the loss threshold in 3 epochs: the one flagged sample.
    losses = pd.DataFrame(
        [{"run": "r", "sample_id": str(s), "epoch": e, "step": e, "label": int(y), "loss": 2.0 if i == 0 else 0.1} for i, (s, y) in enumerate(zip(sample_ids, frame["label"])) for e in range(3)]
    )
    report = write_report(losses, manifest, FlaggingRule(), tmp_path / "noisy")
    assert report["flagged"] == 1
    tracking.track_noisy_labels(tmp_path / "noisy", manifest)
    noisy = offline_runs(tmp_path / "noisy")["noisy-labels"]
    assert noisy["summary"]["flagged"] == 1 and {"flags", "figures/flag_histogram"} <= noisy["history"]
    (flags_table,) = (tmp_path / "noisy").glob("wandb/offline-run-*/files/media/table/flags_*.table.json")
    table = json.loads(flags_table.read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["sample_id"] for r in rows if r["flagged"]] == [str(sample_ids[0])]
    assert uses(tmp_path / "noisy") == {f"labels-{tracking.content_hash([manifest])}": uses(tmp_path / "noisy")[f"labels-{tracking.content_hash([manifest])}"]}

    # explain: a CV's fold model (the artifact its summary run logs), three overlay pages of which a few are logged.
    fold_dir = tmp_path / "cv" / "runs" / "fold0-seed0"
    save_finetuned(tiny_classifier(), fold_dir / "model")
    rng = np.random.default_rng(1)
    for index in range(4):
        write_grayscale(tmp_path / "images" / f"v{index}.png", rng.integers(0, 255, size=(32, 32), dtype=np.uint8))
    summary = run_explain(fold_dir / "model.safetensors", tmp_path / "images", tmp_path / "explain", image_size=32, rows_per_page=1, batch_size=4)
    explain = offline_runs(tmp_path / "explain")["explain"]
    assert {f"overlays/overlays-{i:03d}" for i in range(tracking.EXPLAIN_IMAGES)} | {"per_image"} == explain["history"]
    assert explain["summary"]["prediction_change_rate"] == pytest.approx(summary["prediction_change_rate"])
    used = uses(tmp_path / "explain")["model-cv-fold0-seed0"]
    assert used["digest"] == wandb_digest("x", "model", {p.name: p for p in sorted(fold_dir.iterdir()) if p.suffix in (".safetensors", ".json")})


def test_a_stage_prints_one_line_about_its_offline_run(tmp_path, monkeypatch, capfd):
    """`tus noisy-labels` on a recorded loss table, W&B offline and nothing set to silence it
    (conftest's WANDB_SILENT removed): W&B's banner and sync hints stay off (also those of its
    service process, hence capfd), and tus prints one line saying where the run is and how to
    upload it."""
    from tests.helpers import make_labeled_dataset
    from tus.cli.noisy_labels import main
    from tus.data.manifest import load_manifest

    for name in ("WANDB_SILENT", "WANDB_CONSOLE", "WANDB_QUIET", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    manifest = make_labeled_dataset(tmp_path / "labeled", patients=4, per_patient=1)
    frame = load_manifest(manifest, require_labels=True, decode_images=False)
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "metrics.json").write_text("{}")  # a finished run
    pd.DataFrame([{"sample_id": s, "epoch": e, "step": e, "label": int(y), "loss": 0.1} for s, y in zip(frame["sample_id"], frame["label"]) for e in range(3)]).to_csv(
        tmp_path / "cv" / "losses.csv", index=False
    )
    out = tmp_path / "flags"
    capfd.readouterr()
    assert main([str(tmp_path / "cv"), "--manifest", str(manifest), "--out", str(out)]) == 0
    captured = capfd.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if re.search(r"wandb|w&b", line, re.IGNORECASE)]
    assert len(lines) == 1, lines
    (folder,) = tracking.offline_run_folders([out])
    assert lines[0] == f"W&B noisy-labels run flags: offline in {folder}; upload with: tus wandb export {out}"
    assert f"written to {out}" in captured.out


def test_predict_run_uses_the_fold_models_and_logs_its_predictions(tmp_path, offline):
    from tests.callbacks.test_gradcam import tiny_classifier
    from tus.methods.classifier import save_finetuned

    fold_dir = tmp_path / "cv" / "runs" / "fold1-seed0"
    save_finetuned(tiny_classifier(), fold_dir / "model")
    out = tmp_path / "preds.csv"
    out.write_text("sample_id,prob_1\na.png,0.25\n")
    result = {"model": str(tmp_path / "cv"), "kind": "single", "members": [str(fold_dir)], "threshold": 0.5, "images": 1, "labelled": {"metrics": {"f1": 0.5, "auroc": None}}}
    assert tracking.track_predict(out, result) == tmp_path / "preds.wandb"
    run = offline_runs(tmp_path / "preds.wandb")["predict"]
    assert run["summary"]["f1"] == 0.5 and run["summary"]["images"] == 1 and "auroc" not in run["summary"]
    used = uses(tmp_path / "preds.wandb")["model-cv-fold1-seed0"]
    assert used["digest"] == wandb_digest("x", "model", {p.name: p for p in sorted(fold_dir.iterdir()) if p.suffix in (".safetensors", ".json")})
    (logged,) = [row for row in tracking.read_lineage(tmp_path / "preds.wandb") if row["direction"] == "log"]
    assert logged["name"] == f"predictions-{tracking.content_hash([out])}"
    assert logged["digest"] == wandb_digest("x", "predictions", {"preds.csv": out})
