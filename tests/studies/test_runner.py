"""``tus experiment``: every study plans, runs shrunk on phantom data, resumes, and renders its table.

One module-scoped run executes each study on stand-ins for its inputs (phantom labelled set
and pool, organ-split pools, "synthetic" manifests, oracle-filtered/flipped manifests, random
USCL-layout and timm weights files). tab2 runs every arm (every kind of initialisation);
the other studies run a few arms and must still render every arm of the paper's table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torchvision
import yaml
from lightning.pytorch.loggers.logger import DummyLogger
from safetensors.torch import save_file

import tus.cli.experiment as experiment_cli
import tus.data.folds
import tus.data.manifest
import tus.stages.finetune_cv
import tus.studies.runner as runner
import tus.studies.schema as schema
from tus.config import ConfigError, from_dict, load_config, load_yaml
from tus.data.phantom import generate_phantom
from tus.methods.classifier import METRIC_NAMES
from tus.stages.diffusion import DiffusionConfig
from tus.stages.finetune_cv import FineTuneCVConfig
from tus.stages.pretrain import PretrainConfig

REPO = Path(__file__).resolve().parents[2]
STUDIES = REPO / "experiments" / "studies"
STUDY_NAMES = ("tab1", "tab2", "tab3", "tab4", "markers")
# Arms run per study (None: all). The rest must still appear in the table, as not run.
RUN_ARMS = {
    "tab2": None,
    "tab1": ["flipped"],
    "tab3": ["thyroids_synthetic_filtered", "real_both"],
    "tab4": ["supervised_only", "lambda_0.2"],
    "markers": ["none", "spatial_markers"],
}
PAPER_HEADERS = {
    "tab1": ["Dataset", "Protocol", "Accuracy (↑)", "F1-Score (↑)"],
    "tab2": ["Pretraining", "# Samples", "Accuracy (↑)", "F1-Score (↑)", "Precision (↑)", "Recall (↑)"],
    "tab3": ["Real Testicle", "Real Thyroids", "Synthetic Testicle", "Accuracy (↑)", "F1-Score (↑)", "Precision (↑)", "Recall (↑)"],
    "tab4": ["L_con", "L_sup", "λ", "Accuracy (↑)", "F1-Score (↑)"],
    "markers": ["Training augmentation", "Accuracy, clean (↑)", "F1-Score, clean (↑)", "Accuracy, + markers (↑)", "F1-Score, + markers (↑)", "Predictions flipped by markers (↓)"],
}
POOL_SIZE = 48
# Every run of this module (the fixture's and the re-runs', which must match it to count as
# finished) skips what no test here reads: the CV figures (tests/test_figures.py and
# test_finetune_cv.py check them; 43 s of the fixture's 140 s) and the channels_last
# 'auto' timing trials (16 trial steps per new model and batch shape, 8x a shrunk run's
# 2 steps: 14 s; tests/callbacks/test_performance.py checks them).
SMOKE = schema.StageOverrides(pretrain=["trainer.channels_last=false"], finetune=["figures=false", "trainer.channels_last=false"])


def build_standins(root: Path) -> dict[str, str]:
    """A value for every variable the studies use, from the phantom and random weights."""
    phantom = generate_phantom(root / "phantom", num_patients=20, images_per_patient=(2, 3), image_size=32, pool_size=POOL_SIZE, label_noise=0.1)
    labeled = pd.read_csv(phantom.labeled_manifest)
    pool = pd.read_csv(phantom.unlabeled_manifest)
    labeled["path"] = [str(phantom.labeled_manifest.parent / p) for p in labeled["path"]]
    pool["path"] = [str(phantom.unlabeled_manifest.parent / p) for p in pool["path"]]
    variables = {"TUS_LABELED": str(phantom.labeled_manifest), "TUS_POOL": str(phantom.unlabeled_manifest)}
    for organ in ("testicle", "thyroid"):
        path = root / f"pool_{organ}.csv"
        pool[pool["organ"] == organ].to_csv(path, index=False)
        variables[f"TUS_POOL_{organ.upper()}"] = str(path)
    # Generated images come without an organ column (the studies label them testicle).
    generated = pool[pool["organ"] == "testicle"].drop(columns=["organ"])
    generated.to_csv(root / "synthetic.csv", index=False)
    generated.iloc[::2].to_csv(root / "synthetic_filtered.csv", index=False)
    variables["TUS_SYNTHETIC"] = str(root / "synthetic.csv")
    variables["TUS_SYNTHETIC_FILTERED"] = str(root / "synthetic_filtered.csv")
    torch.manual_seed(0)
    features = torch.nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-1])
    uscl = {f"features.{k}": v for k, v in features.state_dict().items()} | {"fc.weight": torch.zeros(3, 512)}
    torch.save(uscl, root / "uscl.pth")
    save_file(timm.create_model("resnet18").state_dict(), str(root / "imagenet.safetensors"))
    variables["USCL_WEIGHTS"] = str(root / "uscl.pth")
    variables["TUS_IMAGENET_WEIGHTS"] = str(root / "imagenet.safetensors")
    return variables


class Calls:
    """Counts calls of the runner's stage functions (wrapping, not replacing, them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.counts = {"run_pretraining": 0, "run_cv": 0, "run_single": 0}
        for module, name in ((runner, "run_pretraining"), (runner, "run_cv"), (tus.stages.finetune_cv, "run_single")):
            monkeypatch.setattr(module, name, self._counted(name, getattr(module, name)))

    def _counted(self, name, function):
        def wrapper(*args, **kwargs):
            self.counts[name] += 1
            return function(*args, **kwargs)

        return wrapper


class RecordingWandbLogger(DummyLogger):
    """Stands in for W&B: records what each run would have sent (group, job type, tags, config)."""

    created: list[dict] = []

    def __init__(self, **kwargs):
        super().__init__()
        RecordingWandbLogger.created.append(kwargs)


@pytest.fixture(scope="module")
def study_runs(tmp_path_factory):
    """Every study run shrunk into one --out; returns (out, variables, call counts per study)."""
    root = tmp_path_factory.mktemp("studies")
    variables = build_standins(root / "inputs")
    out = root / "runs"
    counts = {}
    with pytest.MonkeyPatch.context() as patch:
        # W&B "on" (offline) so the runner's grouping reaches the logger, recorded instead of synced.
        patch.setenv("WANDB_MODE", "offline")
        patch.setattr("lightning.pytorch.loggers.WandbLogger", RecordingWandbLogger)
        patch.setattr("tus.tracking.start_run", lambda *args, **kwargs: None)  # no summary runs or artifacts either
        calls = Calls(patch)
        for name in ("tab2", "tab3", "tab4", "tab1", "markers"):
            before = dict(calls.counts)
            runner.run_study(schema.load_study(STUDIES / f"{name}.yaml"), out, arms=RUN_ARMS[name], variables=variables, shrink=True, extra=SMOKE)
            counts[name] = {k: calls.counts[k] - before[k] for k in calls.counts}
    return out, variables, counts


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of the first markdown table in ``markdown`` (the comparison table follows it)."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start:end]]


@pytest.mark.parametrize("name", STUDY_NAMES)
def test_each_study_renders_the_papers_table_with_every_arm(study_runs, name):
    out, _, _ = study_runs
    study = schema.load_study(STUDIES / f"{name}.yaml")
    study_dir = out / f"{name}-shrink"
    header, rule, *rows = table_rows((study_dir / "table.md").read_text())
    assert header[: len(PAPER_HEADERS[name])] == PAPER_HEADERS[name]
    assert len(header) == len(study.config.table.columns) + len(study.config.table.metrics)
    assert len(rows) == len(study.config.arms)
    run = RUN_ARMS[name] or list(study.config.arms)
    for arm, row in zip(study.config.arms, rows):
        assert row[: len(study.config.table.columns)] == [str(study.config.arms[arm].row[c]).replace("{pretrain_images}", row[1]) for c in study.config.table.columns]
        metric_cells = row[len(study.config.table.columns) :]
        if arm not in run:
            assert metric_cells == ["—"] * len(metric_cells)
            continue
        for cell in metric_cells:
            mean, std = (float(x) for x in re.fullmatch(r"\**(\d+\.\d\d) ± (\d+\.\d\d)\**", cell).groups())
            assert 0 <= mean <= 100 and 0 <= std <= 100
    # The best mean of each metric column is bold (ties all bold), and only the best.
    for column, metric in enumerate(study.config.table.metrics, start=len(study.config.table.columns)):
        cells = [r[column] for r in rows if r[column] != "—"]
        means = [float(c.strip("*").split(" ")[0]) for c in cells]
        better = {**schema.CV_METRICS, **schema.MARKER_METRICS}[metric].better
        if better and len(means) > 1:
            best = max(means) if better == "higher" else min(means)
            assert [c.startswith("**") for c in cells] == [m == best for m in means], (metric, cells)
    frame = pd.read_csv(study_dir / "table.csv")
    assert list(frame["arm"]) == list(study.config.arms)
    for arm in run:
        summary = json.loads((study_dir / arm / "finetune" / "summary.json").read_text())
        row = frame.set_index("arm").loc[arm]
        assert row["runs"] == summary["expected_runs"] == 2  # shrunk: 2 folds x 1 seed
        for metric in set(study.config.table.metrics) & set(schema.CV_METRICS):
            assert row[f"{metric}_mean"] == pytest.approx(100 * summary["metrics"][metric]["mean"])


def test_arms_share_pretraining_runs_across_studies(study_runs):
    out, _, counts = study_runs
    # exclude_labeled: per_fold (the default): one pretraining per arm and test fold (2 shrunk folds).
    assert counts["tab2"]["run_pretraining"] == 3 * 2
    # tab3 real_both and tab4 lambda_0.2 ask for tab2's `ud` pretraining: only the new ones ran.
    assert counts["tab3"]["run_pretraining"] == 2 and counts["tab4"]["run_pretraining"] == 2
    assert counts["tab1"]["run_pretraining"] == counts["markers"]["run_pretraining"] == 0

    def pretrain_run(study, arm):
        return json.loads((out / f"{study}-shrink" / arm / "arm.json").read_text())["pretrain_run"]

    assert pretrain_run("tab2", "ud") == pretrain_run("tab3", "real_both") == pretrain_run("tab4", "lambda_0.2")
    assert len({pretrain_run("tab2", a) for a in ("ud", "ud_testicles", "ud_thyroids")}) == 3
    assert pretrain_run("tab2", "scratch") is None
    # Each tus arm fine-tuned fold k from its own fold-k encoder, whose pool left out fold k's test patients.
    config = yaml.safe_load((out / "tab2-shrink" / "ud_testicles" / "finetune" / "config.yaml").read_text())
    record = json.loads((out / "tab2-shrink" / "ud_testicles" / "arm.json").read_text())
    # Studies re-draw folds per seed: one pretraining per (seed, fold); shrunk: one seed.
    assert record["exclude_labeled"] == "per_fold" and list(record["pretrain_runs"]) == ["seed0-fold0", "seed0-fold1"]
    fold0 = record["pretrain_runs"]["seed0-fold0"]
    assert fold0 == pretrain_run("tab2", "ud_testicles") and fold0.endswith("-seed0-fold0")
    assert config["model"]["init"] == "tus" and config["model"]["weights"] == str(Path(fold0.removesuffix("seed0-fold0") + "seed{seed}-fold{fold}") / "encoder")
    folds = pd.read_csv(out / "tab2-shrink" / "ud_testicles" / "finetune" / "folds.csv", dtype={"patient_id": str})
    for fold, run in enumerate(record["pretrain_runs"].values()):
        exclusion = json.loads((Path(run) / "encoder" / "config.json").read_text())["exclusion"]
        assert exclusion["mode"] == "test_folds" and exclusion["test_folds"] == [fold]
        tested = folds.loc[(folds["fold"] == fold) & (folds["seed"] == 0), "patient_id"] if "seed" in folds.columns else folds.loc[folds["fold"] == fold, "patient_id"]
        assert exclusion["excluded_patients"] == sorted(set(tested))
    pool = json.loads((Path(pretrain_run("tab2", "ud_testicles")) / "pool.json").read_text())
    assert pool["images_per_organ"] == {"testicle": pd.read_csv(study_runs[1]["TUS_POOL_TESTICLE"]).shape[0]}
    # Non-tus arms: the initialisation each names, from the weights files given as variables.
    models = {a: yaml.safe_load((out / "tab2-shrink" / a / "finetune" / "config.yaml").read_text())["model"] for a in ("scratch", "imagenet", "uscl")}
    assert models["scratch"]["init"] == "scratch" and models["scratch"]["weights"] is None
    assert models["imagenet"] == {**models["imagenet"], "init": "timm", "weights": study_runs[1]["TUS_IMAGENET_WEIGHTS"]}
    assert models["uscl"] == {**models["uscl"], "init": "uscl", "weights": study_runs[1]["USCL_WEIGHTS"]}
    rows = {r[0]: r for r in table_rows((out / "tab2-shrink" / "table.md").read_text())}
    assert rows["UD"][1] == str(POOL_SIZE) and rows["UD (only testicles)"][1] == str(sum(pool["images_per_organ"].values()))
    assert rows["ImageNet"][1] == "1.28M"
    # lambda reached the loss config; single-organ and synthetic-only pools are contrastive only.
    losses = {a: yaml.safe_load((Path(pretrain_run(s, a)) / "config.yaml").read_text())["method"]["loss"] for s, a in [("tab4", "supervised_only"), ("tab2", "ud"), ("tab2", "ud_thyroids")]}
    assert losses["supervised_only"]["contrastive_weight"] == 0 and losses["supervised_only"]["organ_weight"] == 1
    assert losses["ud"]["organ_weight"] == pytest.approx(0.2) and losses["ud_thyroids"]["organ_weight"] == 0


def test_every_arm_of_a_study_reads_one_fold_table_and_is_paired(study_runs):
    """tab2 ran every arm: each read the study's one fold table (folds re-drawn per seed, the
    study default) and wrote the same folds.csv test sets; the table says they are paired."""
    out, variables, _ = study_runs
    tables = sorted((out / "tab2-shrink" / "folds").glob("*.csv"))
    assert len(tables) == 1 and "seed" in pd.read_csv(tables[0]).columns
    arms = schema.load_study(STUDIES / "tab2.yaml").config.arms
    tested = {}
    for arm in arms:
        config = yaml.safe_load((out / "tab2-shrink" / arm / "finetune" / "config.yaml").read_text())
        assert config["data"]["folds_from"] == str(tables[0]) and config["data"]["folds_per_seed"] is True
        folds = pd.read_csv(out / "tab2-shrink" / arm / "finetune" / "folds.csv", dtype={"sample_id": str})
        tested[arm] = {key: set(rows["sample_id"]) for key, rows in folds.groupby(["fold", "seed"])}
    assert all(t == next(iter(tested.values())) for t in tested.values())
    labelled = pd.read_csv(variables["TUS_LABELED"], dtype={"sample_id": str})
    assert set().union(*next(iter(tested.values())).values()) == set(labelled["sample_id"])
    comparison = (out / "tab2-shrink" / "table.md").read_text().split("**Compared with")[1]
    rows = [r for r in table_rows(comparison) if r[0] in arms]
    assert len(rows) == len(arms) - 1 and all(r[1].startswith("yes") for r in rows)
    # --shrink runs one seed: one split, so the table compares by the patient bootstrap and says so
    assert "one split shared by every seed" in comparison


def test_rerun_skips_finished_work_and_resumes_unfinished(study_runs, monkeypatch):
    out, variables, _ = study_runs
    calls = Calls(monkeypatch)
    tab2 = schema.load_study(STUDIES / "tab2.yaml")
    before = (out / "tab2-shrink" / "table.md").read_text()
    runner.run_study(tab2, out, variables=variables, shrink=True, extra=SMOKE)
    assert calls.counts == {"run_pretraining": 0, "run_cv": 0, "run_single": 0}
    assert (out / "tab2-shrink" / "table.md").read_text() == before
    # An arm whose summary is gone is handed back to run_cv, which finds every fold finished.
    (out / "tab1-shrink" / "flipped" / "finetune" / "summary.json").unlink()
    runner.run_study(schema.load_study(STUDIES / "tab1.yaml"), out, arms=["flipped"], variables=variables, shrink=True, extra=SMOKE)
    assert calls.counts == {"run_pretraining": 0, "run_cv": 1, "run_single": 0}
    assert (out / "tab1-shrink" / "flipped" / "finetune" / "summary.json").is_file()


def test_a_finished_arm_with_a_changed_config_is_refused(study_runs):
    out, variables, _ = study_runs

    def rerun_flipped(finetune_override: str) -> None:
        extra = schema.StageOverrides(pretrain=SMOKE.pretrain, finetune=[*SMOKE.finetune, finetune_override])
        runner.run_study(schema.load_study(STUDIES / "tab1.yaml"), out, arms=["flipped"], variables=variables, shrink=True, extra=extra)

    with pytest.raises(schema.StudyError, match=r"arm 'flipped' finished with a different config \(optim.lr_head\)"):
        rerun_flipped("optim.lr_head=0.5")
    # Where it ran is not what it computed: a device override reuses the finished arm.
    rerun_flipped("trainer.accelerator=auto")


def test_wandb_runs_are_grouped_by_study_and_arm(study_runs):
    created = RecordingWandbLogger.created
    finetune = [k for k in created if k["group"] == "tab2-shrink/uscl"]
    assert len(finetune) == 2 and {k["job_type"] for k in finetune} == {"finetune"}
    assert {tuple(sorted(set(k["tags"]) - {"tab2", "uscl", "shrink"})) for k in finetune} == {("fold0", "seed0"), ("fold1", "seed0")}
    assert all(k["config"]["name"] == "tab2-shrink-uscl" and k["config"]["logging"]["tags"] == ["tab2", "uscl", "shrink"] for k in finetune)
    assert all(k["mode"] == "offline" and k["save_dir"].endswith(("fold0-seed0", "fold1-seed0")) for k in finetune)
    pretrain = [k for k in created if k["group"] == "tab2-shrink/ud"]
    assert {k["job_type"] for k in pretrain} == {"pretrain", "finetune"}
    assert {"tab2", "ud", "pretrain"} <= set(next(k for k in pretrain if k["job_type"] == "pretrain")["tags"])


def test_marker_study_measures_the_same_markers_on_every_arm(study_runs):
    out, _, _ = study_runs
    arms = {arm: out / "markers-shrink" / arm for arm in RUN_ARMS["markers"]}
    for arm_dir in arms.values():
        for fold in (0, 1):
            record = json.loads((arm_dir / "markers" / f"fold{fold}-seed0.json").read_text())
            cv = json.loads((arm_dir / "finetune" / "runs" / f"fold{fold}-seed0" / "metrics.json").read_text())
            # The clean half of the measurement is the CV's own test: same model, same images.
            assert record["clean_accuracy"] == pytest.approx(cv["accuracy"], abs=1e-6)
            assert record["clean_f1"] == pytest.approx(cv["f1"], abs=1e-6)
            assert 0 <= record["flip_rate"] <= 1 and 0 < record["marker_area"] < 0.5
            assert 0 <= record["cam_mass_marked"] <= 1 and 0 <= record["cam_mass_clean"] <= 1
        assert (arm_dir / "markers" / "fold0-seed0-overlays.png").stat().st_size > 0
    per_image = [pd.read_csv(arm_dir / "markers" / "fold1-seed0-per_image.csv") for arm_dir in arms.values()]
    assert list(per_image[0]["image"]) == list(per_image[1]["image"])
    np.testing.assert_array_equal(per_image[0]["marker_area"], per_image[1]["marker_area"])


def test_table_command_renders_from_run_dirs(study_runs, capsys):
    out, _, _ = study_runs
    assert experiment_cli.main(["table", str(STUDIES / "tab4.yaml"), "--out", str(out), "--shrink"]) == 0
    printed = capsys.readouterr().out
    assert "| L_con | L_sup | λ | Accuracy (↑) | F1-Score (↑) |" in printed and "Not finished: lambda_0.0 (not run)" in printed
    assert experiment_cli.main(["table", str(STUDIES / "tab4.yaml"), "--out", str(out)]) == 2  # no full-size runs there


def test_finetune_stage_needs_the_pretraining_and_dry_run_only_plans(study_runs, monkeypatch, capsys):
    out, variables, _ = study_runs
    calls = Calls(monkeypatch)
    tab3 = schema.load_study(STUDIES / "tab3.yaml")
    with pytest.raises(schema.StudyError, match=r"arm 'synthetic' needs its pretraining .*run --stage pretrain"):
        runner.run_study(tab3, out, arms=["synthetic"], variables=variables, shrink=True, stage="finetune", extra=SMOKE)
    arguments = [f"--set={k}={v}" for k, v in variables.items()]
    assert experiment_cli.main(["run", str(STUDIES / "tab3.yaml"), "--out", str(out), "--shrink", "--dry-run", *arguments, "--pretrain", *SMOKE.pretrain, "--finetune", *SMOKE.finetune]) == 0
    printed = capsys.readouterr().out
    assert "real_both: " in printed and "(finished)" in printed and "synthetic: " in printed and "(to run)" in printed
    assert calls.counts == {"run_pretraining": 0, "run_cv": 0, "run_single": 0}


def test_missing_variables_are_named_before_anything_runs(tmp_path, monkeypatch, capsys):
    calls = Calls(monkeypatch)
    for name in ("USCL_WEIGHTS", "TUS_POOL", "TUS_POOL_TESTICLE"):
        monkeypatch.delenv(name, raising=False)
    code = experiment_cli.main(["run", str(STUDIES / "tab2.yaml"), "--out", str(tmp_path), "--shrink", "--set", "TUS_LABELED=x.csv", "--set", "TUS_POOL_THYROID=y.csv"])
    error = capsys.readouterr().err
    assert code == 2 and "${USCL_WEIGHTS} (arms: uscl)" in error and "${TUS_POOL_TESTICLE} (arms: ud_testicles)" in error and "${TUS_POOL} (arms: ud)" in error
    assert "TUS_POOL_THYROID" not in error and "TUS_IMAGENET_WEIGHTS" not in error  # set, or has a default
    assert calls.counts == {"run_pretraining": 0, "run_cv": 0, "run_single": 0}
    assert not any(tmp_path.iterdir())


class Placeholders(dict):
    def __missing__(self, name: str) -> str:
        return f"/placeholder/{name}"


STAGE_SCHEMAS = {"finetune": FineTuneCVConfig, "pretrain": PretrainConfig, "diffusion": DiffusionConfig}


@pytest.mark.parametrize("path", sorted((REPO / "experiments").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_every_config_in_experiments_resolves_against_the_code(path, tmp_path):
    relative = path.relative_to(REPO / "experiments")
    if relative.parts[0] == "studies":
        if path.stem.startswith("_"):  # a partial merged into studies: its schema only
            from_dict(schema.StudyConfig, load_yaml(path))
            return
        study = schema.load_study(path)
        for shrink in (False, True):
            plans = runner.plan_study(study, tmp_path, variables=Placeholders(), shrink=shrink)
            assert [p.name for p in plans] == list(study.config.arms)
            if study.config.noisy_labels is not None:
                assert list(runner.plan_flagging(study, tmp_path, variables=Placeholders(), shrink=shrink)) == list(study.config.noisy_labels.inits)
    elif relative.parts[0] in STAGE_SCHEMAS:
        load_config(STAGE_SCHEMAS[relative.parts[0]], path)
    elif relative.parts[0] == "benchmarks":  # read by a benchmark script, which checks it
        assert isinstance(load_yaml(path), dict)
    else:
        pytest.fail(f"{relative}: no schema known for this config; add it to STAGE_SCHEMAS")


def write_study(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"base: {STUDIES / '_base.yaml'}\nfinetune_config: {REPO / 'experiments/finetune/paper.yaml'}\npretrain_config: {REPO / 'experiments/pretrain/paper.yaml'}\n{text}")
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("arms: {a: {row: {Arm: x}, finetun: []}}", r"unknown option 'arms.a.finetun'"),
        ("table: {columns: [Arm], metric: [f1]}", r"unknown option 'table.metric'"),
        ("table: {metrics: [f1, flip_rate]}", r"unknown metric\(s\) \['flip_rate'\]"),
        ("arms: {a: {row: {Dataset: x}}}", r"arms.a.row: needs exactly the table's columns \['Arm'\]; missing \['Arm'\], unknown \['Dataset'\]"),
        ("arms: {a: {row: {Arm: x}, pretrain: [], finetune: [model.init=timm]}}", r"arms.a.finetune: \['model.init=timm'\]"),
        ("arms: {a/b: {row: {Arm: x}}}", r"arms.a/b: arm names become folder names"),
    ],
)
def test_a_study_with_an_unknown_option_fails(tmp_path, text, message):
    with pytest.raises(schema.StudyError, match=message):
        schema.load_study(write_study(tmp_path, text))


def test_an_override_naming_an_unknown_config_key_fails(tmp_path):
    study = schema.load_study(write_study(tmp_path, "arms: {a: {row: {Arm: x}, finetune: [model.nmae=resnet18]}, b: {row: {Arm: y}, pretrain: [method.loss.lambda=0.2]}}"))
    with pytest.raises(schema.StudyError, match=r"arm 'a', finetune \(paper.yaml\): unknown option 'model.nmae'"):
        runner.plan_study(study, tmp_path, variables=Placeholders(), arms=["a"])
    with pytest.raises(schema.StudyError, match=r"arm 'b', pretrain \(paper.yaml\): unknown option 'method.loss.lambda'"):
        runner.plan_study(study, tmp_path, variables=Placeholders(), arms=["b"])
    with pytest.raises(schema.StudyError, match=r"no arm\(s\) \['c'\]; arms: a, b"):
        runner.plan_study(study, tmp_path, variables=Placeholders(), arms=["c"])
    with pytest.raises(ConfigError):
        from_dict(schema.StudyConfig, {"arms": {"a": {"row": {"Arm": 1}, "pretrain": "not a list"}}})


def test_every_cv_metric_has_a_table_header():
    assert set(schema.CV_METRICS) == set(METRIC_NAMES)


def test_variables_substitute_with_defaults_and_set_beats_environment():
    missing: set[str] = set()
    text = schema.substitute("a=${X} b=${Y:-null} c=${Z:-} d=${W}", {"X": "1", "W": "w"}, missing)
    assert text == "a=1 b=null c= d=w" and not missing
    schema.substitute("${NOPE}/m.csv", {}, missing)
    assert missing == {"NOPE"}
    assert experiment_cli.parse_assignments(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(schema.StudyError, match="expected NAME=VALUE"):
        experiment_cli.parse_assignments(["1A=x"])


def per_seed_folds(n_images: int = 90, seeds: int = 4, rng_seed: int = 0) -> pd.DataFrame:
    """A folds.csv with folds re-drawn per seed: 3 folds of n/3 images, one partition per seed."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for seed in range(seeds):
        order = rng.permutation(n_images)
        rows += [{"sample_id": str(i), "patient_id": f"p{i}", "label": int(i % 2), "fold": int(np.flatnonzero(order == i)[0] % 3), "seed": seed} for i in range(n_images)]
    return pd.DataFrame(rows)


def comparison_study(tmp_path: Path, shifts: dict[str, float], noise: float = 0.02, seed: int = 0, folds: dict[str, pd.DataFrame] | None = None):
    """A study dir of fake finished arms: runs.csv (3 folds x 4 seeds) shifted from the baseline's,
    and folds.csv (folds re-drawn per seed, the same for every arm unless ``folds`` says otherwise)."""
    from types import SimpleNamespace

    from tus.studies.tables import collect_results

    arms = {name: schema.ArmConfig(row={"Arm": name}) for name in shifts}
    study = SimpleNamespace(name="fake", config=SimpleNamespace(arms=arms, table=schema.TableConfig(metrics=["accuracy", "f1"]), title=""))
    rng = np.random.default_rng(seed)
    keys = pd.DataFrame([(f, s) for s in range(4) for f in range(3)], columns=["fold", "seed"])
    base = rng.uniform(0.6, 0.8, len(keys))
    for name, shift in shifts.items():
        finetune = tmp_path / name / "finetune"
        finetune.mkdir(parents=True)
        values = base + shift + (rng.normal(0, noise, len(keys)) if shift is not None and name != next(iter(shifts)) else 0)
        runs = keys.assign(accuracy=values, f1=values - 0.1)
        runs.to_csv(finetune / "runs.csv", index=False)
        summary = {"runs": len(runs), "expected_runs": 12, "metrics": {m: {"mean": float(runs[m].mean()), "std": float(runs[m].std()), "n": 12} for m in ("accuracy", "f1")}}
        (finetune / "summary.json").write_text(json.dumps(summary))
        # 90 images in 3 folds of 30 per seed: n_train/n_test = 60/30
        (folds or {}).get(name, per_seed_folds()).to_csv(finetune / "folds.csv", index=False)
    return study, collect_results(study, tmp_path)


def test_table_compares_each_arm_with_the_baseline_by_hand(tmp_path):
    from scipy import stats

    from tus.studies.tables import render_markdown, table_frame

    study, results = comparison_study(tmp_path, {"base": 0.0, "same": 0.0, "better": 0.1})
    by_name = {r.name: r for r in results}
    assert by_name["base"].comparisons == {}
    base = pd.read_csv(tmp_path / "base" / "finetune" / "runs.csv")
    for name in ("same", "better"):
        arm = pd.read_csv(tmp_path / name / "finetune" / "runs.csv")
        d = (arm["accuracy"] - base["accuracy"]).to_numpy()
        se = np.sqrt((1 / 12 + 30 / 60) * d.var(ddof=1))  # Nadeau-Bengio, n_test/n_train = 1/2
        comparison = by_name[name].comparisons["accuracy"]
        assert comparison["mean_diff"] == pytest.approx(d.mean())
        assert comparison["p"] == pytest.approx(2 * stats.t.sf(abs(d.mean() / se), df=11))
        assert (comparison["ci_low"], comparison["ci_high"]) == pytest.approx((d.mean() - stats.t.ppf(0.975, 11) * se, d.mean() + stats.t.ppf(0.975, 11) * se))
        assert (comparison["design"], comparison["splits"]) == ("per_seed", 4)
    assert by_name["better"].comparisons["accuracy"]["p"] < 0.01
    markdown = render_markdown(study, results)
    rows = {r[0]: r for r in table_rows(markdown.split("**Compared with `base`**")[1])}
    assert list(rows) == ["Arm", ":--", "same", "better"]
    better = by_name["better"].comparisons["accuracy"]
    expected = f"{100 * better['mean_diff']:+.2f}*** [{100 * better['ci_low']:+.2f}, {100 * better['ci_high']:+.2f}], p<0.001"
    assert rows["better"][1:3] == ["yes, 12 runs", expected] and better["p"] < 0.001
    assert "folds re-drawn per seed (4 splits)" in markdown and "Nadeau-Bengio corrected resampled t-test" in markdown
    assert "one split shared" not in markdown
    # the paper's table above is unchanged: mean ± std cells only
    assert re.fullmatch(r"\**\d+\.\d\d ± \d+\.\d\d\**", table_rows(markdown)[2][1])
    frame = table_frame(study, results).set_index("arm")
    assert frame.loc["better", "accuracy_diff"] == pytest.approx(100 * by_name["better"].comparisons["accuracy"]["mean_diff"])
    assert np.isnan(frame.loc["base", "accuracy_diff"])


def test_arms_tested_on_different_splits_are_refused_in_one_line(tmp_path):
    """A hand-built study whose 'resplit' arm drew its own folds for seed 2 (as the noisy-label
    arms did when they re-split their own manifest): no numbers, one line naming both arms."""
    from tus.studies.tables import render_markdown

    folds = per_seed_folds()
    resplit = pd.concat([folds[folds["seed"] != 2], per_seed_folds(rng_seed=7).query("seed == 2")])
    study, results = comparison_study(tmp_path, {"base": 0.0, "paired": 0.05, "resplit": 0.05}, folds={"resplit": resplit})
    by_name = {r.name: r for r in results}
    assert "error" not in by_name["paired"].comparisons["accuracy"]
    error = by_name["resplit"].comparisons["accuracy"]["error"]
    assert "\n" not in error and error.startswith("arms 'base' and 'resplit' were not tested on the same images in 3 of 12 runs")
    markdown = render_markdown(study, results)
    rows = {r[0]: r for r in table_rows(markdown.split("**Compared with `base`**")[1])}
    assert rows["paired"][1] == "yes, 12 runs" and rows["resplit"][1:] == ["no", "—", "—"]
    assert [line for line in markdown.splitlines() if line.startswith("Not compared")] == [f"Not compared: {error}."]


def test_one_split_shared_by_every_seed_is_compared_by_a_patient_bootstrap(tmp_path):
    """folds.csv without a seed column: the table uses the patient bootstrap of the paired
    difference on the pooled test predictions, and says so."""
    from sklearn.metrics import accuracy_score

    from tus.studies.tables import render_markdown

    one = per_seed_folds(seeds=1).drop(columns="seed")
    study, _ = comparison_study(tmp_path, {"base": 0.0, "arm": 0.05}, folds={"base": one, "arm": one})
    rng = np.random.default_rng(0)
    labels = one.set_index("sample_id")["label"]
    for name, skill in (("base", 0.6), ("arm", 0.8)):
        for fold in range(3):
            for seed in range(4):
                run = tmp_path / name / "finetune" / "runs" / f"fold{fold}-seed{seed}"
                run.mkdir(parents=True)
                ids = one.loc[one["fold"] == fold, "sample_id"]
                correct = rng.random(len(ids)) < skill
                prediction = np.where(correct, labels.loc[ids], 1 - labels.loc[ids])
                pd.DataFrame({"sample_id": ids, "label": labels.loc[ids].to_numpy(), "probability": prediction * 0.8 + 0.1, "prediction": prediction}).to_csv(run / "predictions.csv", index=False)
                (run / "metrics.json").write_text(json.dumps({"fold": fold, "seed": seed}))
    from tus.studies.tables import collect_results

    results = collect_results(study, tmp_path)
    comparison = results[1].comparisons["accuracy"]
    assert (comparison["design"], comparison["test"], comparison["n_pairs"], comparison["patients"]) == ("one_split", "patient_bootstrap", 12, 90)
    pooled = {name: pd.concat([pd.read_csv(p) for p in sorted((tmp_path / name / "finetune" / "runs").glob("*/predictions.csv"))]) for name in ("base", "arm")}
    by_hand = {name: accuracy_score(t["label"], t["prediction"]) for name, t in pooled.items()}
    assert comparison["mean_diff"] == pytest.approx(by_hand["arm"] - by_hand["base"])
    assert comparison["ci_low"] < comparison["mean_diff"] < comparison["ci_high"] and comparison["p"] < 0.01
    markdown = render_markdown(study, results)
    assert "one split shared by every seed" in markdown and "patient bootstrap" in markdown and "Nadeau-Bengio" not in markdown


def split_correlated_study(rng: np.random.Generator, n_patients: int = 60, folds: int = 3, seeds: int = 4, noise: float = 0.05, shift: float = 0.0, runs_only: bool = False):
    """Two arms' runs under folds re-drawn per seed, where the per-run difference is a
    split-level random effect plus run noise: each patient i carries a paired difference
    delta_i ~ N(0, 1) (+ ``shift``), a run's split effect is the mean delta of its test patients,
    so runs whose test folds share patients (across seeds) share part of their effect.
    ``runs_only``: just the 12 differences."""
    from tus.studies.tables import ArmRuns

    delta = rng.normal(shift, 1.0, n_patients)
    orders = [rng.permutation(n_patients) for _ in range(seeds)]
    tests = [(fold, seed, orders[seed][fold::folds]) for seed in range(seeds) for fold in range(folds)]
    diffs = np.array([delta[test].mean() for _, _, test in tests]) + rng.normal(0, noise, len(tests))
    if runs_only:
        return diffs
    rows = [{"sample_id": str(i), "patient_id": str(i), "fold": fold, "seed": seed} for fold, seed, test in tests for i in test]
    table = pd.DataFrame(rows)
    runs = pd.DataFrame({"fold": [f for f, _, _ in tests], "seed": [s for _, s, _ in tests], "diff": diffs})
    baseline = ArmRuns("baseline", runs.assign(accuracy=0.0), table)
    arm = ArmRuns("arm", runs.assign(accuracy=runs["diff"]), table)
    return baseline, arm, runs["diff"].to_numpy()


def test_study_statistics_hold_their_level_under_split_correlated_differences():
    """Under the null (patient effects of mean 0) the study's test (folds re-drawn per seed: the
    Nadeau-Bengio corrected test over the runs) rejects at most the nominal 5% within its
    Monte-Carlo error, while the uncorrected paired t-test on the same runs clearly does not."""
    from scipy import stats

    from tus.eval.statistics import nadeau_bengio_ttest
    from tus.studies.tables import compare_pair

    # The table's comparison of these runs is the corrected test with n_train/n_test = 40/20 ...
    for repetition in range(10):
        baseline, arm, diffs = split_correlated_study(np.random.default_rng(repetition))
        comparison = compare_pair(baseline, arm, "accuracy")
        assert (comparison["design"], comparison["test"], comparison["n_pairs"]) == ("per_seed", "nadeau_bengio", 12)
        assert comparison["p"] == pytest.approx(nadeau_bengio_ttest(diffs, 40, 20)[1], rel=1e-9)
    # ... so its level is simulated through that function (the table's pandas plumbing is slow).
    repetitions = 2000
    study_p, naive_p = [], []
    for repetition in range(repetitions):
        diffs = split_correlated_study(np.random.default_rng(repetition), runs_only=True)
        study_p.append(nadeau_bengio_ttest(diffs, 40, 20)[1])
        naive_p.append(stats.ttest_1samp(diffs, 0.0).pvalue)
    mc_error = np.sqrt(0.05 * 0.95 / repetitions)
    study_rate, naive_rate = np.mean(np.array(study_p) < 0.05), np.mean(np.array(naive_p) < 0.05)
    assert study_rate <= 0.05 + 3 * mc_error, study_rate  # measured: 0.031
    assert naive_rate > 0.05 + 10 * mc_error, naive_rate  # measured: 0.38; the same test fails the uncorrected one
    # ...and the corrected test is not vacuous: a true shift of 0.5 patient-sd is found most of the time
    power = np.mean([nadeau_bengio_ttest(split_correlated_study(np.random.default_rng(10_000 + r), shift=0.5, runs_only=True), 40, 20)[1] < 0.05 for r in range(300)])
    assert power > 0.5, power


def test_unpaired_arms_are_not_compared_and_say_why(tmp_path):
    from tus.studies.tables import render_markdown

    study, _ = comparison_study(tmp_path, {"base": 0.0, "short": 0.05})
    runs = pd.read_csv(tmp_path / "short" / "finetune" / "runs.csv")
    runs[runs["seed"] < 3].to_csv(tmp_path / "short" / "finetune" / "runs.csv", index=False)
    from tus.studies.tables import collect_results

    results = collect_results(study, tmp_path)
    assert "missing from arm" in results[1].comparisons["accuracy"]["error"]
    assert "Not compared: runs do not pair on (fold, seed)" in render_markdown(study, results)


def test_pool_exclusion_modes_plan_per_fold_all_or_none(tmp_path, capsys):
    """per_fold: one pretraining per fold (x seed with folds per seed) and a {fold} encoder path;
    all: one pool without the labelled set; none: the pool as given, with the leakage warning."""
    phantom = generate_phantom(tmp_path / "phantom", num_patients=15, image_size=32, pool_size=12)
    pool = pd.read_csv(phantom.unlabeled_manifest)
    pool["path"] = [str(phantom.unlabeled_manifest.parent / p) for p in pool["path"]]
    labeled_image = pd.read_csv(phantom.labeled_manifest)["path"][0]
    copy = pd.DataFrame({"path": [str(phantom.labeled_manifest.parent / labeled_image)], "patient_id": ["x"], "organ": ["testicle"], "sample_id": ["copy"]})
    pd.concat([pool, copy], ignore_index=True).to_csv(tmp_path / "pool.csv", index=False)
    arms = (
        "arms: {"
        "fold: {row: {Arm: a}, pretrain: []}, "
        "seeded: {row: {Arm: b}, pretrain: [], finetune: [data.folds_per_seed=true, 'seeds=[0, 1]']}, "
        "every: {row: {Arm: c}, pretrain: [], exclude_labeled: all}, "
        "given: {row: {Arm: d}, pretrain: [], exclude_labeled: none}, "
        "manual: {row: {Arm: e}, pretrain: [data.exclude_labeled=all]}}\n"
        "folds_per_seed: false\n"
        f"finetune: [data.manifest={phantom.labeled_manifest}, data.num_folds=3]\n"
        f"pretrain: ['data.sources=[{{manifest: \"{tmp_path / 'pool.csv'}\"}}]']\n"
    )
    study = schema.load_study(write_study(tmp_path, arms))
    assert study.config.exclude_labeled == "per_fold"
    plans = {p.name: p for p in runner.plan_study(study, tmp_path / "out", variables={}, arms=["fold", "seeded", "every", "given"])}
    fold = plans["fold"]
    assert [r.excludes for r in fold.pretrains] == ["fold0", "fold1", "fold2"]
    assert [r.config.data.test_folds for r in fold.pretrains] == [[0], [1], [2]]
    assert {r.config.data.exclude_labeled for r in fold.pretrains} == {"test_folds"}
    assert fold.finetune.model.init == "tus" and fold.finetune.model.weights == str(fold.pretrains[0].dir).removesuffix("0") + "{fold}/encoder"
    seeded = plans["seeded"]
    assert [r.excludes for r in seeded.pretrains] == [f"seed{s}-fold{k}" for s in (0, 1) for k in range(3)]
    assert seeded.finetune.model.weights.endswith("-seed{seed}-fold{fold}/encoder")
    (every,) = plans["every"].pretrains
    assert (every.config.data.exclude_labeled, every.config.data.labeled_manifest) == ("all", str(phantom.labeled_manifest))
    assert plans["every"].finetune.model.weights == str(every.dir / "encoder")
    (given,) = plans["given"].pretrains
    assert given.config.data.exclude_labeled == "none" and plans["given"].exclude_labeled == "none"
    # The fold table a per-fold pool leaves out is the CV's own (run_cv draws the same folds).
    runner.write_fold_tables(fold.pretrains[1])
    table = pd.read_csv(fold.pretrains[1].config.data.labeled_manifest)
    frame = tus.data.manifest.load_manifest(phantom.labeled_manifest, num_folds=3)
    assert list(table["fold"]) == list(tus.data.folds.assign_folds(frame, 3, fold.finetune.data.fold_seed))
    with pytest.raises(schema.StudyError, match=r"arm 'manual': its pretraining sets data.exclude_labeled=all; the study leaves labelled images out itself"):
        runner.plan_study(study, tmp_path / "out", variables={}, arms=["manual"])
    # Only the arm that keeps the pool as given is warned about, and the copy is counted.
    runner.warn_pool_overlap(list(plans.values()))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: arm 'given': 1 images of its pretraining pool")
