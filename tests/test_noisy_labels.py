"""Noisy-label flagging: exact counts on hand-made trajectories, manifests, and the phantom protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tus.cli.noisy_labels import main as noisy_labels_main
from tus.data.images import write_grayscale
from tus.data.manifest import load_manifest
from tus.data.phantom import generate_phantom
from tus.eval.noisy_labels import FlaggingRule, LossTableError, find_loss_tables, flag_samples, histogram, read_losses
from tus.studies.noisy_labels import NoisyLabelsProtocol, expand_dotted, load_protocol, run_protocol

REPO = Path(__file__).resolve().parents[1]




# Per sample and run: the recorded losses, one per occurrence (None = not trained in that run).
TRAJECTORIES = {
    #            run a                       run b                      run c
    "always":   ([2.0, 1.5, 1.2, 0.9],      [1.1, 1.3, 1.01, 0.2],     [3.0, 2.0, 1.5, 1.2, 1.1]),
    "twice":    ([2.0, 1.5, 1.2, 0.9],      [1.1, 1.3, 1.01, 0.2],     [0.3, 0.2, 0.1]),
    "at_one":   ([1.0, 1.0, 1.0, 1.0],      [1.0, 1.0, 1.0],           [1.0, 1.0, 1.0]),  # not *above*
    "two_runs": ([5.0, 4.0, 3.0, 2.0, 1.5], None,                      [1.5, 1.5, 1.5, 1.5, 1.5]),
    "once":     ([1.5, 0.4, 0.3],           [0.2, 0.1],                [1.2, 0.3]),
    "clean":    ([0.6, 0.3, 0.1],           [0.5, 0.2],                [0.4, 0.1, 0.05]),
}
LABELS = {"always": 1, "twice": 0, "at_one": 0, "two_runs": 0, "once": 1, "clean": 0}
# the phantom-style truth: "always", "two_runs" and "once" carry flipped labels
CLEAN_LABELS = {**LABELS, "always": 0, "two_runs": 1, "once": 0}


def hand_made_losses() -> pd.DataFrame:
    rows = []
    for sample, runs in TRAJECTORIES.items():
        for run, losses in zip("abc", runs):
            for step, loss in enumerate(losses or []):
                # two occurrences per epoch: a weighted sampler's repeat draws count separately
                rows.append({"run": run, "sample_id": sample, "epoch": step // 2, "step": step, "label": LABELS[sample], "loss": loss})
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("min_exceed", "min_fraction", "expected_flagged_in", "expected_flagged"),
    [
        (3, 1.0, {"always": 3, "twice": 2, "at_one": 0, "two_runs": 2, "once": 0, "clean": 0}, {"always", "two_runs"}),
        (1, 1.0, {"always": 3, "twice": 2, "at_one": 0, "two_runs": 2, "once": 2, "clean": 0}, {"always", "two_runs"}),
        (5, 1.0, {"always": 1, "twice": 0, "at_one": 0, "two_runs": 2, "once": 0, "clean": 0}, {"two_runs"}),
        (3, 0.5, {"always": 3, "twice": 2, "at_one": 0, "two_runs": 2, "once": 0, "clean": 0}, {"always", "twice", "two_runs"}),
        (1, 0.5, {"always": 3, "twice": 2, "at_one": 0, "two_runs": 2, "once": 2, "clean": 0}, {"always", "twice", "two_runs", "once"}),
    ],
)
def test_flags_exactly_the_samples_it_should(min_exceed, min_fraction, expected_flagged_in, expected_flagged):
    flags = flag_samples(hand_made_losses(), FlaggingRule(threshold=1.0, min_exceed=min_exceed, min_fraction=min_fraction))
    assert flags["flagged_in"].to_dict() == expected_flagged_in
    assert flags["evaluations"].to_dict() == {"always": 3, "twice": 3, "at_one": 3, "two_runs": 2, "once": 3, "clean": 3}
    assert set(flags.index[flags["flagged"]]) == expected_flagged


def test_histogram_counts_samples_per_flag_count():
    table = histogram(hand_made_losses(), threshold=1.0)
    counts = {m: dict(zip(g["flagged_in"], g["samples"])) for m, g in table.groupby("min_exceed")}
    assert counts[1] == {0: 2, 1: 0, 2: 3, 3: 1}
    assert counts[3] == {0: 3, 1: 0, 2: 2, 3: 1}
    assert counts[5] == {0: 4, 1: 1, 2: 1, 3: 0}


def write_fixture(root: Path) -> tuple[Path, list[Path]]:
    """A labelled manifest of the hand-made samples and three finished single-run folders."""
    rng = np.random.default_rng(0)
    rows = []
    for index, sample in enumerate(TRAJECTORIES):
        write_grayscale(root / "data" / f"{sample}.png", rng.integers(0, 255, size=(8, 8), dtype=np.uint8))
        rows.append({"path": f"{sample}.png", "patient_id": f"P{index}", "label": LABELS[sample], "clean_label": CLEAN_LABELS[sample], "note": f"n{index}", "sample_id": f"{sample}"})
    manifest = root / "data" / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    run_dirs = []
    losses = hand_made_losses()
    for run, rows in losses.groupby("run"):
        run_dir = root / f"cv-{run}"
        (run_dir / "runs" / "fold0-seed0").mkdir(parents=True)
        rows.drop(columns="run").assign(fold=0, seed=0, init=run).to_csv(run_dir / "runs" / "fold0-seed0" / "losses.csv", index=False)
        (run_dir / "runs" / "fold0-seed0" / "metrics.json").write_text("{}")
        (run_dir / "config.yaml").write_text(f"data:\n  manifest: {manifest}\n")
        run_dirs.append(run_dir)
    return manifest, run_dirs


def test_report_and_manifests_differ_from_the_input_only_in_flagged_rows(tmp_path, capsys):
    manifest, run_dirs = write_fixture(tmp_path)
    original = manifest.read_bytes()
    out = tmp_path / "flags"
    # no --manifest: the one in the runs' config.yaml
    assert noisy_labels_main([*map(str, run_dirs), "--out", str(out)]) == 0
    assert manifest.read_bytes() == original

    flagged = pd.read_csv(out / "flagged.csv")
    assert flagged[["sample_id", "label", "flagged_in", "evaluations"]].values.tolist() == [["always", 1, 3, 3], ["two_runs", 0, 2, 2]]
    assert flagged["path"].tolist() == [str((tmp_path / "data" / f"{s}.png").resolve()) for s in ("always", "two_runs")]

    source = load_manifest(manifest).set_index("sample_id")
    filtered = load_manifest(out / "manifest_filtered.csv").set_index("sample_id")
    flipped = load_manifest(out / "manifest_flipped.csv").set_index("sample_id")
    columns = ["abs_path", "patient_id", "label", "clean_label", "note"]
    assert list(filtered.index) == ["twice", "at_one", "once", "clean"]
    pd.testing.assert_frame_equal(filtered[columns], source.loc[filtered.index, columns])
    assert list(flipped.index) == list(source.index)
    changed = flipped["label"] != source["label"]
    assert set(flipped.index[changed]) == {"always", "two_runs"}
    assert ((flipped["label"] == 1 - source["label"]) | ~changed).all()
    pd.testing.assert_frame_equal(flipped.loc[~changed, columns], source.loc[~changed, columns])
    pd.testing.assert_frame_equal(flipped[["abs_path", "patient_id", "clean_label", "note"]], source[["abs_path", "patient_id", "clean_label", "note"]])

    report = json.loads((out / "report.json").read_text())
    assert report["flagged"] == 2 and report["max_evaluations"] == 3
    assert report["against_clean_label"] == {"noisy_samples": 3, "flagged_noisy": 2, "precision": 1.0, "recall": pytest.approx(2 / 3)}
    assert report["histogram"]["3"] == {"0": 3, "1": 0, "2": 2, "3": 1}
    for image in ("flag_histogram.png", "loss_trajectories.png"):
        assert (out / image).stat().st_size > 1000
    assert "precision 100.0%, recall 66.7%" in capsys.readouterr().out


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    manifest, run_dirs = write_fixture(tmp_path)
    other = tmp_path / "data" / "other.csv"
    pd.read_csv(manifest).query("sample_id != 'once'").to_csv(other, index=False)
    assert noisy_labels_main([*map(str, run_dirs), "--manifest", str(other), "--out", str(tmp_path / "o1")]) == 1
    assert "not in this manifest, e.g. ['once']" in capsys.readouterr().out
    relabelled = tmp_path / "data" / "relabelled.csv"
    pd.read_csv(manifest).assign(label=lambda f: 1 - f["label"]).to_csv(relabelled, index=False)
    assert noisy_labels_main([*map(str, run_dirs), "--manifest", str(relabelled), "--out", str(tmp_path / "o2")]) == 1
    assert "trained with another label" in capsys.readouterr().out
    (run_dirs[0] / "runs" / "fold0-seed0" / "metrics.json").unlink()
    with pytest.raises(LossTableError, match="run not finished"):
        read_losses(find_loss_tables(run_dirs))
    with pytest.raises(SystemExit):
        noisy_labels_main([*map(str, run_dirs), "--out", str(tmp_path / "data")])  # exists


def test_protocol_configs_compose_and_name_their_inits():
    finetune, protocol = load_protocol(REPO / "experiments" / "noisy_labels.yaml", ["noisy_labels.inits.uscl.model.weights=/elsewhere/uscl.pth"])
    assert finetune["trainer"]["max_epochs"] == 30 and finetune["seeds"] == [0, 1, 2, 3] and finetune["data"]["num_folds"] == 3
    assert protocol.inits == {"imagenet": {"model": {"init": "timm"}}, "uscl": {"model": {"init": "uscl", "weights": "/elsewhere/uscl.pth"}}}
    assert (protocol.threshold, protocol.min_exceed, protocol.min_fraction) == (1.0, 3, 1.0)
    _, cpu = load_protocol(REPO / "experiments" / "noisy_labels_cpu.yaml")
    assert expand_dotted(cpu.inits["resnet10t"]) == {"model": {"name": "resnet10t"}}
    with pytest.raises(ValueError, match="noisy_labels.inits.bad"):
        load_protocol(REPO / "experiments" / "noisy_labels_cpu.yaml", ["noisy_labels.inits.bad.model.nam=resnet18"])



@pytest.mark.slow
def test_protocol_on_a_phantom_with_flipped_labels(tmp_path, capsys):
    """The whole study, reduced: 1 init x 1 seed x 3 folds (2 evaluations per sample instead of
    16), a tiny ResNet at 64 px for 12 epochs, and 1-epoch final CVs; the rule is the paper's."""
    manifest = generate_phantom(tmp_path / "phantom", num_patients=40, image_size=64, label_noise=0.1, pool_size=0, seed=1).labeled_manifest
    finetune, _ = load_protocol(REPO / "experiments" / "noisy_labels_cpu.yaml", [
        f"data.manifest={manifest}", "seeds=[0]", "data.batch_size=16", "trainer.max_epochs=12",
        "optim.lr_backbone=3e-3", "optim.lr_head=3e-3", "logging.wandb=false", "trainer.enable_progress_bar=false",
    ])
    protocol = NoisyLabelsProtocol(inits={"tiny": {"model.name": "test_resnet"}}, evaluation={"model.name": "test_resnet", "trainer.max_epochs": 1})
    out = run_protocol(finetune, protocol, tmp_path / "study")

    report = json.loads((out / "flags" / "report.json").read_text())
    quality = report["against_clean_label"]
    clean_flagged = report["flagged"] - quality["flagged_noisy"]
    clean_samples = report["samples"] - quality["noisy_samples"]
    assert quality["noisy_samples"] == round(0.1 * report["samples"])
    assert quality["recall"] >= 0.6  # most flipped labels are found...
    assert clean_flagged <= 0.1 * clean_samples and quality["precision"] >= 0.5  # ...and few clean ones
    assert report["max_evaluations"] == 2

    losses = pd.read_csv(out / "flagging" / "tiny" / "runs" / "fold0-seed0" / "losses.csv")
    assert set(losses["init"]) == {"tiny"} and losses["epoch"].max() == 11
    table = pd.read_csv(out / "table1.csv").set_index("dataset")
    assert list(table.index) == ["complete", "filtered", "flipped"]
    assert table.loc["filtered", "images"] == report["samples"] - report["flagged"] == len(pd.read_csv(out / "flags" / "manifest_filtered.csv"))
    assert (table["runs"] == 3).all() and table["f1_mean"].between(0, 1).all()
    assert "| Filtered |" in (out / "table1.md").read_text()

    # resuming a finished study trains nothing and keeps the flags
    finished = {p: p.stat().st_mtime_ns for p in [out / "flags" / "report.json", *out.glob("*/*/runs/*/model.safetensors")]}
    assert len(finished) == 1 + 3 + 3 * 3
    run_protocol(finetune, protocol, out)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    with capsys.disabled():
        print(f"\nphantom flagging: precision {quality['precision']:.2f}, recall {quality['recall']:.2f}, "
              f"{clean_flagged} of {clean_samples} clean samples flagged")
