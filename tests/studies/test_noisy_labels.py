"""Noisy-label flagging: exact counts on hand-made trajectories, manifests, and the phantom protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tus.studies.runner as runner
from tus.cli.main import main as tus_main
from tus.cli.noisy_labels import main as noisy_labels_main
from tus.data.images import write_grayscale
from tus.data.manifest import load_manifest
from tus.data.phantom import generate_phantom
from tus.eval.noisy_labels import FlaggingRule, LossTableError, find_loss_tables, flag_samples, histogram, read_losses
from tus.studies.noisy_labels import fold_safe_manifests
from tus.studies.schema import StageOverrides, StudyError, load_study

REPO = Path(__file__).resolve().parents[2]


# Per sample and run: the recorded losses, one per occurrence (None = not trained in that run).
TRAJECTORIES = {
    #            run a                       run b                      run c
    "always": ([2.0, 1.5, 1.2, 0.9], [1.1, 1.3, 1.01, 0.2], [3.0, 2.0, 1.5, 1.2, 1.1]),
    "twice": ([2.0, 1.5, 1.2, 0.9], [1.1, 1.3, 1.01, 0.2], [0.3, 0.2, 0.1]),
    "at_one": ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),  # not *above*
    "two_runs": ([5.0, 4.0, 3.0, 2.0, 1.5], None, [1.5, 1.5, 1.5, 1.5, 1.5]),
    "once": ([1.5, 0.4, 0.3], [0.2, 0.1], [1.2, 0.3]),
    "clean": ([0.6, 0.3, 0.1], [0.5, 0.2], [0.4, 0.1, 0.05]),
}
LABELS = {"always": 1, "twice": 0, "at_one": 0, "two_runs": 0, "once": 1, "clean": 0}
# the phantom-style truth: "always", "two_runs" and "once" carry flipped labels
CLEAN_LABELS = {**LABELS, "always": 0, "two_runs": 1, "once": 0}


def hand_made_losses() -> pd.DataFrame:
    rows = []
    for sample, runs in TRAJECTORIES.items():
        for run, losses in zip("abc", runs):
            for step, loss in enumerate(losses or []):
                # one draw per epoch: per-epoch and per-draw counting agree (repeat draws: tests/eval)
                rows.append({"run": run, "sample_id": sample, "epoch": step, "step": step, "label": LABELS[sample], "loss": loss})
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
@pytest.mark.parametrize("counting", ["per_epoch", "per_draw"])
def test_flags_exactly_the_samples_it_should(min_exceed, min_fraction, expected_flagged_in, expected_flagged, counting):
    flags = flag_samples(hand_made_losses(), FlaggingRule(threshold=1.0, min_exceed=min_exceed, min_fraction=min_fraction, counting=counting))
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
    assert tus_main(["noisy-labels", *map(str, run_dirs), "--manifest", str(other), "--out", str(tmp_path / "o1")]) == 1
    assert "not in this manifest, e.g. ['once']" in capsys.readouterr().err
    relabelled = tmp_path / "data" / "relabelled.csv"
    pd.read_csv(manifest).assign(label=lambda f: 1 - f["label"]).to_csv(relabelled, index=False)
    assert tus_main(["noisy-labels", *map(str, run_dirs), "--manifest", str(relabelled), "--out", str(tmp_path / "o2")]) == 1
    assert "trained with another label" in capsys.readouterr().err
    (run_dirs[0] / "runs" / "fold0-seed0" / "metrics.json").unlink()
    with pytest.raises(LossTableError, match="run not finished"):
        read_losses(find_loss_tables(run_dirs))
    assert tus_main(["noisy-labels", *map(str, run_dirs), "--out", str(tmp_path / "data")]) == 2  # exists
    assert tus_main(["noisy-labels", str(run_dirs[0]), str(run_dirs[0]), "--out", str(tmp_path / "o3")]) == 2
    assert "given more than once" in capsys.readouterr().err


def test_noisy_label_studies_compose_and_name_their_inits(tmp_path):
    study = load_study("studies/tab1").config
    assert study.noisy_labels.inits == {"imagenet": ["model.init=timm"], "uscl": ["model.init=uscl", "model.weights=${USCL_WEIGHTS}"]}
    assert (study.noisy_labels.threshold, study.noisy_labels.min_exceed, study.noisy_labels.min_fraction, study.noisy_labels.counting) == (1.0, 3, 1.0, "per_epoch")
    assert {name: (arm.labels, arm.label_protocol) for name, arm in study.arms.items()} == {
        "complete": ("complete", "reference"),
        "filtered": ("filtered", "reference"),
        "flipped": ("flipped", "reference"),
        "filtered_fold_safe": ("filtered", "fold_safe"),
        "flipped_fold_safe": ("flipped", "fold_safe"),
    }
    cpu = load_study("studies/noisy_labels_cpu")
    assert cpu.config.finetune_config == "../finetune/cpu.yaml" and set(cpu.config.noisy_labels.inits) == {"resnet18", "resnet10t"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {cpu.path}\nnoisy_labels:\n  inits:\n    bad: [model.nam=resnet18]\n")
    with pytest.raises(StudyError, match=r"noisy_labels.inits.bad.*model.nam"):
        runner.plan_flagging(load_study(bad), tmp_path, variables={"TUS_LABELED": "x.csv"})
    no_block = tmp_path / "no_block.yaml"
    no_block.write_text(f"base: {cpu.path.parent / '_base.yaml'}\ntable: {{columns: [D]}}\narms: {{f: {{row: {{D: x}}, labels: filtered}}}}\n")
    with pytest.raises(StudyError, match="needs the study's noisy_labels"):
        load_study(no_block)


def per_fold_losses() -> pd.DataFrame:
    """Flagging runs (test fold k, seed s) of one init over samples A (fold 0), B (fold 1) and C
    (fold 2); a run trains on the two samples outside its test fold, 4 epochs each. A has high
    losses only in the runs tested on fold 1, B in every run, C only in run (0, seed 0)."""
    fold_of = {"A": 0, "B": 1, "C": 2}
    high = {("A", 1, 0), ("A", 1, 1), ("B", 0, 0), ("B", 0, 1), ("B", 2, 0), ("B", 2, 1), ("C", 0, 0)}
    rows = []
    for k in range(3):
        for seed in range(2):
            for sample, fold in fold_of.items():
                if fold == k:
                    continue
                for epoch in range(4):
                    loss = 2.0 if (sample, k, seed) in high else 0.2
                    rows.append({"run": f"init/fold{k}-seed{seed}", "sample_id": sample, "epoch": epoch, "step": epoch, "label": 0, "loss": loss, "fold": k, "seed": seed, "init": "init"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("per_seed", "expected"),
    [
        # one split: run (k, s) is flagged from runs (k, every seed): C is high in 1 of its 2
        (False, {(0, 0): {"B"}, (0, 1): {"B"}, (1, 0): {"A"}, (1, 1): {"A"}, (2, 0): {"B"}, (2, 1): {"B"}}),
        # folds per seed: run (k, s) from run (k, s) alone
        (True, {(0, 0): {"B", "C"}, (0, 1): {"B"}, (1, 0): {"A"}, (1, 1): {"A"}, (2, 0): {"B"}, (2, 1): {"B"}}),
    ],
)
def test_fold_safe_flags_come_from_the_runs_tested_on_that_fold_only(per_seed, expected):
    from tus.studies.noisy_labels import fold_safe_flags

    losses = per_fold_losses()
    table = fold_safe_flags(losses, FlaggingRule(), seeds=[0, 1], per_seed=per_seed)
    got = {key: set(rows["sample_id"]) for key, rows in table.groupby(["fold", "seed"])}
    assert got == expected
    # the flags from every run (the old fold-safe flags) miss A: suspicious in 2 of its 4 runs
    assert set(flag_samples(losses, FlaggingRule()).query("flagged").index) == {"B"}
    # no flag of run (k, s) comes from a run that trained on fold k: A (fold 0) is never flagged for fold 0
    assert "A" not in got[(0, 0)] | got[(0, 1)]


@pytest.mark.parametrize("variant", ["filtered", "flipped"])
def test_fold_safe_manifests_never_change_a_test_fold(tmp_path, variant):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        write_grayscale(tmp_path / "data" / f"s{i:02d}.png", rng.integers(0, 255, size=(8, 8), dtype=np.uint8))
        rows.append({"path": f"s{i:02d}.png", "patient_id": f"P{i}", "label": int(i % 3 == 0), "note": f"n{i}"})
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "manifest.csv", index=False)
    manifest = load_manifest(tmp_path / "data" / "manifest.csv")
    folds = np.arange(12) % 3
    # Each test fold has its own flags (from the flagging runs tested on it); s00 is in fold 0,
    # so fold 0's own flag set could not even name it, but fold 1's and 2's do.
    flagged = {0: {"s04.png", "s05.png"}, 1: {"s00.png", "s11.png"}, 2: {"s00.png", "s04.png", "s05.png"}}
    paths = fold_safe_manifests(manifest, folds, flagged, variant, tmp_path / "fold_safe")
    assert sorted(paths) == [0, 1, 2]
    source = manifest.assign(fold=folds).set_index("sample_id")
    columns = ["abs_path", "patient_id", "label", "note", "fold"]
    # the training rows each run changes, by hand: fold k's flags minus fold k's own rows
    changed_by_hand = {0: {"s04.png", "s05.png"}, 1: {"s00.png", "s11.png"}, 2: {"s00.png", "s04.png"}}
    for fold, path in paths.items():
        written = load_manifest(path).astype({"fold": int}).set_index("sample_id")
        test = written[written["fold"] == fold]
        # the test fold: every original row, with its original label, nothing else
        pd.testing.assert_frame_equal(test[columns], source[source["fold"] == fold][columns])
        train = written[written["fold"] != fold]
        expected = source[source["fold"] != fold]
        changed = expected.index.isin(sorted(changed_by_hand[fold]))
        if variant == "filtered":
            pd.testing.assert_frame_equal(train[columns], expected[~changed][columns])
        else:
            assert list(train.index) == list(expected.index)
            assert (train["label"] == np.where(changed, 1 - expected["label"], expected["label"])).all()


@pytest.mark.slow
def test_noisy_label_study_on_a_phantom_with_flipped_labels(tmp_path, capsys):
    """The whole study through the study runner, reduced: 1 init x 1 seed x 3 folds (2
    evaluations per sample instead of 16), a tiny ResNet at 64 px for 12 epochs, 1-epoch arms."""
    manifest = generate_phantom(tmp_path / "phantom", num_patients=40, image_size=64, label_noise=0.1, pool_size=0, seed=1).labeled_manifest
    study_file = tmp_path / "noisy.yaml"
    cpu = load_study("studies/noisy_labels_cpu").path.read_text()
    study_file.write_text(
        cpu.replace("base: _base.yaml", f"base: {load_study('studies/noisy_labels_cpu').path.parent / '_base.yaml'}").replace(
            "    resnet18: [model.name=resnet18, model.init=scratch]\n    resnet10t: [model.name=resnet10t, model.init=scratch]", "    tiny: [model.name=test_resnet]"
        )
    )
    study = load_study(study_file)
    assert list(study.config.noisy_labels.inits) == ["tiny"]
    # No CV figures (nothing here reads them; ~3 s per CV) and channels_last on, as 'auto' chose it
    # here after timing (61 vs 77 ms a step), without the 16 timing steps.
    common = [
        "seeds=[0, 1]",
        "data.batch_size=16",
        "optim.lr_backbone=3e-3",
        "optim.lr_head=3e-3",
        "logging.wandb=false",
        "trainer.enable_progress_bar=false",
        "model.name=test_resnet",
        "figures=false",
        "trainer.channels_last=true",
    ]
    variables = {"TUS_LABELED": str(manifest)}
    arms = ["complete", "filtered", "flipped", "flipped_fold_safe"]
    # The flagging CVs train 12 epochs; the arms 1 epoch (a later override wins).
    flagging = runner.plan_flagging(study, tmp_path / "out", variables=variables, extra=StageOverrides(finetune=[*common, "trainer.max_epochs=12"]))
    assert flagging["tiny"].record_losses and flagging["tiny"].trainer.max_epochs == 12
    from tus.eval.noisy_labels import FlaggingRule as Rule
    from tus.studies.noisy_labels import flag_labels

    study_dir = study.output_dir(tmp_path / "out", False)
    runner.write_shared_fold_table(flagging["tiny"], flagging["tiny"].data.manifest, study)  # as run_study does first
    flags = flag_labels(flagging, study_dir / "_flagging", study_dir / "flags", Rule(), [1, 3, 5])
    out = runner.run_study(study, tmp_path / "out", arms=arms, variables=variables, extra=StageOverrides(finetune=[*common, "trainer.max_epochs=1"]))
    assert flags == out / "flags"

    report = json.loads((out / "flags" / "report.json").read_text())
    quality = report["against_clean_label"]
    clean_flagged = report["flagged"] - quality["flagged_noisy"]
    clean_samples = report["samples"] - quality["noisy_samples"]
    assert quality["noisy_samples"] == round(0.1 * report["samples"])
    # ...many flipped labels are found: with per-epoch counting (the reference) this reduced run
    # (12 epochs, 2 evaluations) found 7 of 15 (precision 0.70); per-draw counting found 11 but
    # flagged the oversampled positives more often (9 of 15 flags were positives vs 6 of 10)
    assert quality["recall"] >= 0.4
    assert clean_flagged <= 0.1 * clean_samples and quality["precision"] >= 0.5  # ...and few clean ones
    assert report["max_evaluations"] == 4  # 2 seeds x 2 training folds

    losses = pd.read_csv(out / "_flagging" / "tiny" / "runs" / "fold0-seed0" / "losses.csv")
    assert set(losses["init"]) == {"tiny"} and losses["epoch"].max() == 11
    flipped_config = (out / "flipped" / "finetune" / "config.yaml").read_text()
    assert "flags/manifest_flipped.csv" in flipped_config
    # fold-safe: each test fold keeps its labels; the training folds have the flags flipped
    fold_safe = sorted((out / "flipped_fold_safe" / "finetune" / "fold_safe").glob("fold*.csv"))
    assert len(fold_safe) == 3 * 2
    table = (out / "table.md").read_text()
    assert "| Flipped | reference |" in table and "| Flipped | fold-safe |" in table

    # Paired by construction: every CV read the study's one fold table (folds re-drawn per seed)...
    shared = sorted((out / "folds").glob("*.csv"))
    assert len(shared) == 1 and set(pd.read_csv(shared[0])["seed"]) == {0, 1}
    cvs = {arm: out / arm / "finetune" for arm in arms} | {"flagging": out / "_flagging" / "tiny"}
    for cv in cvs.values():
        assert f"folds_from: {shared[0]}" in (cv / "config.yaml").read_text()

    def tested(cv: Path) -> dict:  # (fold, seed) -> the sample ids of that test fold, from folds.csv
        folds = pd.read_csv(cv / "folds.csv", dtype={"sample_id": str})
        return {key: set(rows["sample_id"]) for key, rows in folds.groupby(["fold", "seed"])}

    complete = tested(cvs["complete"])
    assert len(complete) == 6 and complete[(0, 0)] != complete[(0, 1)]  # two different splits
    flagged = set(pd.read_csv(out / "flags" / "flagged.csv", dtype={"sample_id": str})["sample_id"])
    assert flagged
    for name in ("flagging", "flipped", "flipped_fold_safe"):
        assert tested(cvs[name]) == complete, name
    # ...the reference filtered arm kept every remaining row's fold (its test folds lost the flagged rows)...
    assert tested(cvs["filtered"]) == {key: ids - flagged for key, ids in complete.items()}
    # ...and each comparison in the table is between identical test sets, or refused in one line.
    rows = {r[0]: r for r in _table_rows(table.split("**Compared with `complete`**")[1])}
    paired = [name for name in arms[1:] if rows[name][1].startswith("yes")]
    assert sorted(paired) == ["flipped", "flipped_fold_safe"]
    assert all(tested(cvs[name]) == complete for name in paired)
    assert rows["filtered"][1] == "no" and "Not compared: arms 'complete' and 'filtered' were not tested on the same images in 6 of 6 runs" in table
    assert "folds re-drawn per seed (2 splits)" in table and "Nadeau-Bengio" in table

    # Fold-safe flags: run (k, s) was flagged from the flagging run tested on fold k of seed s alone
    per_fold = pd.read_csv(out / "flags" / "fold_safe_flags.csv", comment="#", dtype={"sample_id": str})
    labels = pd.read_csv(manifest, dtype={"sample_id": str}).set_index("sample_id")["label"]
    assert (per_fold["evaluations"] == 1).all()  # 1 init x the one run (k, s)
    for (k, seed), ids in complete.items():
        flags = set(per_fold.query("fold == @k and seed == @seed")["sample_id"])
        assert not flags & ids  # never a row of the test fold
        written = pd.read_csv(out / "flipped_fold_safe" / "finetune" / "fold_safe" / f"fold{k}-seed{seed}.csv", dtype={"sample_id": str}).set_index("sample_id")
        assert set(written.index[written["label"] != labels.loc[written.index]]) == flags  # exactly this run's flags flipped
    assert "flagged from the flagging runs whose test fold was k only" in table

    # resuming a finished study trains nothing and keeps the flags
    finished = {p: p.stat().st_mtime_ns for p in [out / "flags" / "report.json", *out.glob("*/*/runs/*/model.safetensors")]}
    assert len(finished) == 1 + 6 + 4 * 6  # the flags, the flagging CV (3 folds x 2 seeds), 4 arms x 6 runs
    runner.run_study(study, tmp_path / "out", arms=arms, variables=variables, extra=StageOverrides(finetune=[*common, "trainer.max_epochs=1"]))
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    with capsys.disabled():
        print(f"\nphantom flagging: precision {quality['precision']:.2f}, recall {quality['recall']:.2f}, {clean_flagged} of {clean_samples} clean samples flagged")


def _table_rows(markdown: str) -> list[list[str]]:
    """The cells of the first markdown table in ``markdown``."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]
