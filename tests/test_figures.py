"""Figures are tested on their data: what the artists draw and the sidecar CSVs hold, against
values worked out by hand (never the plotting code's own arithmetic)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from tus.figures import classification as fig
from tus.figures import save
from tus.figures.study import forest_figure


@pytest.fixture(autouse=True)
def png_and_pdf(monkeypatch):
    """These tests check both formats (the suite writes PNG only, tests/conftest.py)."""
    monkeypatch.setenv("TUS_FIGURE_FORMATS", "png,pdf")


# Run A: scores 0.1, 0.4 (negatives) and 0.35, 0.8 (positives): of the 4 positive-negative pairs,
# 3 are ordered right -> AUROC 0.75. Run B separates perfectly -> AUROC 1.0.
RUN_A = {"label": [0, 0, 1, 1], "prob": [0.1, 0.4, 0.35, 0.8], "pred": [0, 0, 0, 1]}
RUN_B = {"label": [0, 1, 0, 1], "prob": [0.2, 0.9, 0.3, 0.7], "pred": [0, 1, 0, 1]}


def predictions() -> pd.DataFrame:
    a = pd.DataFrame(RUN_A).assign(fold=0, seed=0, patient_id=["p1", "p2", "p3", "p4"], sample_id=["a", "b", "c", "d"])
    b = pd.DataFrame(RUN_B).assign(fold=1, seed=0, patient_id=["p5", "p6", "p7", "p8"], sample_id=["e", "f", "g", "h"])
    return pd.concat([a, b], ignore_index=True)


def test_roc_curve_points_and_auroc_match_hand_computed(tmp_path):
    result = fig.roc_figure(predictions(), n_boot=50)
    data = result.data
    run_a = data[data["curve"] == "fold0-seed0"]
    # Thresholds inf, 0.8, 0.4, 0.35, 0.1 -> (FPR, TPR) as counted by hand.
    assert run_a[["x", "y"]].to_numpy().tolist() == [[0, 0], [0, 0.5], [0.5, 0.5], [0.5, 1], [1, 1]]
    assert run_a["auc"].iloc[0] == pytest.approx(0.75)
    assert data[data["curve"] == "fold1-seed0"]["auc"].iloc[0] == pytest.approx(1.0)
    mean = data[data["curve"] == "mean"]
    assert mean["auc"].iloc[0] == pytest.approx(0.875)
    # The mean curve at FPR 0.25: run A is at TPR 0.5, run B at 1 -> 0.75.
    assert mean.loc[np.isclose(mean["x"], 0.25), "y"].item() == pytest.approx(0.75)
    # The axes draw exactly these points, and the legend states the mean AUROC.
    lines = {tuple(np.asarray(line.get_xdata(), float)): np.asarray(line.get_ydata(), float) for line in result.figure.axes[0].get_lines()}
    assert lines[(0.0, 0.0, 0.5, 0.5, 1.0)].tolist() == [0, 0.5, 0.5, 1, 1]
    legend = [t.get_text() for t in result.figure.axes[0].get_legend().get_texts()]
    assert any(t.startswith("mean: AUROC 0.88") for t in legend)
    paths = save(result, tmp_path, "roc")
    assert [p.name for p in paths] == ["roc.png", "roc.pdf", "roc.csv"]
    written = pd.read_csv(tmp_path / "roc.csv")
    assert written[written["curve"] == "fold0-seed0"]["y"].tolist() == [0, 0.5, 0.5, 1, 1]


def test_pr_average_precision_matches_hand_computed():
    data = fig.pr_figure(predictions(), n_boot=50).data
    # Run A by descending score: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): AP = sum over positives
    # of precision at their rank x recall step = 1 * 0.5 + 2/3 * 0.5.
    assert data[data["curve"] == "fold0-seed0"]["auc"].iloc[0] == pytest.approx(0.5 + 1 / 3)
    assert data[data["curve"] == "fold1-seed0"]["auc"].iloc[0] == pytest.approx(1.0)


def test_confusion_counts_summed_over_folds():
    result = fig.confusion_figure(predictions(), classes=("homogeneous", "inhomogeneous"))
    counts = result.data.set_index(["true", "predicted"])["count"].to_dict()
    # Run A: TN 2, FN 1 (0.35), TP 1; run B: TN 2, TP 2.
    assert counts == {(0, 0): 4, (0, 1): 0, (1, 0): 1, (1, 1): 3}
    assert result.data.set_index(["true", "predicted"])["row_percent"][(1, 1)] == pytest.approx(75.0)
    texts = sorted(t.get_text() for t in result.figure.axes[0].texts)
    assert texts == sorted(["4\n100.0%", "0\n0.0%", "1\n25.0%", "3\n75.0%"])
    assert len(result.figure.axes) == 2  # the colour bar


def test_calibration_bins_and_ece():
    frame = pd.DataFrame({"label": [0, 0, 1, 1, 1], "prob": [0.05, 0.15, 0.15, 0.95, 1.0]})
    data = fig.calibration_data(frame, bins=10)
    used = data[data["count"] > 0].set_index("bin_low")
    assert used["count"].tolist() == [1, 2, 2]
    # bins: [0, .1): p .05, obs 0; [.1, .2): p .15, obs .5; [.9, 1]: p .975, obs 1.
    ece = 1 / 5 * 0.05 + 2 / 5 * 0.35 + 2 / 5 * 0.025
    assert data["ece"].iloc[0] == pytest.approx(ece)
    result = fig.calibration_figure(frame)
    assert f"ECE {ece:.3f}" in result.figure.axes[0].get_title()


def test_training_curves_from_lightning_logs():
    log = pd.DataFrame({"epoch": [0, 0, 1, 1], "step": [1, 1, 3, 3], "train/loss_step": [0.9, np.nan, 0.7, np.nan], "train/loss_epoch": [np.nan, 0.8, np.nan, 0.6]})
    result = fig.training_curves_figure({"fold0-seed0": log})
    assert result.data[["epoch", "loss"]].to_numpy().tolist() == [[0, 0.8], [1, 0.6]]
    line = result.figure.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == [0.8, 0.6]


def test_forest_plot_draws_each_arms_difference_and_ci():
    table = pd.DataFrame(
        {
            "arm": ["imagenet", "ours"],
            "auroc_mean": [80.0, 85.0],
            "auroc_std": [2.0, 1.5],
            "auroc_diff": [np.nan, 5.0],
            "auroc_diff_ci_low": [np.nan, 1.0],
            "auroc_diff_ci_high": [np.nan, 9.0],
            "auroc_p": [np.nan, 0.012],
        }
    )
    result = forest_figure(table, "auroc", "imagenet", "AUROC")
    assert result.data.set_index("arm")["diff"].to_dict() == {"imagenet": 0.0, "ours": 5.0}
    axis = result.figure.axes[0]
    bars = [c for c in axis.collections if c.get_segments()]
    (segment,) = bars[0].get_segments()
    assert segment[:, 0].tolist() == [1.0, 9.0]  # the CI drawn
    assert any("p=0.01" in t.get_text() for t in axis.texts)


def test_saving_twice_gives_identical_bytes(tmp_path):
    for folder in ("a", "b"):
        save(fig.confusion_figure(predictions()), tmp_path / folder, "confusion")
    for name in ("confusion.png", "confusion.pdf", "confusion.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_figure_is_laid_out_once_for_all_its_formats(tmp_path):
    """The constrained layout is solved by the first format's draw and reused by the PDF (it cost
    ~0.1 s a figure a format); the PNG is unchanged by it and the figure keeps its engine."""
    result = fig.calibration_figure(predictions())
    engine = result.figure.get_layout_engine()
    solved = []
    solve = engine.execute
    engine.execute = lambda figure: (solved.append(1), solve(figure))[1]
    save(result, tmp_path / "both", "calibration")
    assert len(solved) == 1 and result.figure.get_layout_engine() is engine
    save(fig.calibration_figure(predictions()), tmp_path / "png", "calibration", formats=("png",))
    assert (tmp_path / "both" / "calibration.png").read_bytes() == (tmp_path / "png" / "calibration.png").read_bytes()
    assert (tmp_path / "both" / "calibration.pdf").read_bytes().startswith(b"%PDF")
    # A figure without a layout engine is saved as it is and keeps none.
    from matplotlib.figure import Figure

    from tus.figures.style import FigureData

    plain = Figure(figsize=(2, 2))
    plain.subplots().plot([0, 1], [1, 0])
    save(FigureData(plain, pd.DataFrame({"x": [0, 1]})), tmp_path / "plain", "line")
    assert plain.get_layout_engine() is None and (tmp_path / "plain" / "line.pdf").is_file()


def fake_cv_run(run_dir):
    """A finished CV run dir as run_cv leaves it (the files the figures read)."""
    frame = predictions()
    (run_dir / "runs").mkdir(parents=True)
    frame.assign(path=frame["sample_id"] + ".png")[["sample_id", "path", "patient_id", "label", "fold"]].to_csv(run_dir / "folds.csv", index=False)
    for (fold, seed), rows in frame.groupby(["fold", "seed"]):
        run = run_dir / "runs" / f"fold{fold}-seed{seed}"
        run.mkdir()
        rows.rename(columns={"prob": "probability", "pred": "prediction"})[["sample_id", "label", "probability", "prediction"]].to_csv(run / "predictions.csv", index=False)
        (run / "metrics.json").write_text(json.dumps({"fold": int(fold), "seed": int(seed)}))
        pd.DataFrame({"epoch": [0, 1], "step": [1, 3], "train/loss_epoch": [0.8, 0.5 + fold / 10]}).to_csv(run / "metrics.csv", index=False)


def test_cv_figures_written_and_report_reproduces_them_byte_for_byte(tmp_path):
    from tus.cli.report import main as report_main
    from tus.figures.runs import write_cv_figures

    run_dir = tmp_path / "cv"
    fake_cv_run(run_dir)
    written = write_cv_figures(run_dir, n_boot=50)
    names = sorted(p.name for p in written)
    for stem in ("roc", "pr", "confusion", "calibration", "training_curves"):
        assert {f"{stem}.png", f"{stem}.pdf", f"{stem}.csv"} <= set(names)
    before = {p.name: p.read_bytes() for p in written}
    for p in written:
        p.unlink()
    assert report_main([str(run_dir), "--n-boot", "50"]) == 0
    assert {p.name: p.read_bytes() for p in (run_dir / "figures").iterdir()} == before


def test_report_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    from tus.cli.report import main as report_main

    with pytest.raises(ValueError, match="not a finished tus run"):
        report_main([str(tmp_path)])


def test_umap_keeps_separated_organs_apart_and_draws_its_sidecar(tmp_path):
    """By organ (held-out pool images) and, with a downstream manifest, by label (its images):
    neighbours in the map share their group, and the title's probe value is the run's last."""
    from tus.figures.runs import write_pretrain_figures

    rng = np.random.default_rng(0)
    centres = {"testicle": np.r_[np.ones(4), np.zeros(4)], "thyroid": np.r_[np.zeros(4), np.ones(4)]}
    rows = [{"sample_id": f"{organ}{i}", "organ": organ, **{f"f{j}": v for j, v in enumerate(centre + 0.05 * rng.standard_normal(8))}} for organ, centre in centres.items() for i in range(12)]
    run = tmp_path / "pretrain"
    run.mkdir()
    (run / "pool.json").write_text("{}")
    pd.DataFrame(rows).to_csv(run / "embeddings.csv", index=False)
    labelled = [
        {"sample_id": f"s{label}-{i}", "label": label, "organ": "testicle", **{f"f{j}": v for j, v in enumerate(centre + 0.05 * rng.standard_normal(8))}}
        for label, centre in enumerate(centres.values())
        for i in range(10)
    ]
    pd.DataFrame(labelled).to_csv(run / "downstream_embeddings.csv", index=False)
    (run / "config.yaml").write_text("monitor:\n  downstream_classifier: knn\n")
    downstream = [{"step": 0, "probe/downstream_auroc": 0.6}, {"step": 40, "probe/downstream_auroc": 0.9375}]
    (run / "summary.json").write_text(json.dumps({"steps": 40, "probe": [{"step": 0, "probe/knn_organ_acc": 0.5}, {"step": 40, "probe/knn_organ_acc": 0.875}], "downstream_probe": downstream}))
    pd.DataFrame({"step": [0, 20, 40, 40], "train/loss": [np.nan, 2.0, np.nan, 1.5], "probe/knn_organ_acc": [0.5, np.nan, 0.875, np.nan]}).to_csv(run / "metrics.csv", index=False)
    write_pretrain_figures(run)
    coords = pd.read_csv(run / "figures" / "umap.csv")
    assert len(coords) == 24 and set(coords["organ"]) == set(centres)
    # Each point's nearest neighbour in the map is of its own organ (brute force).
    xy = coords[["umap_x", "umap_y"]].to_numpy()
    distances = np.linalg.norm(xy[:, None] - xy[None], axis=2) + np.eye(len(xy)) * 1e9
    assert (coords["organ"].to_numpy()[distances.argmin(1)] == coords["organ"].to_numpy()).all()
    assert set(coords["probe"]) == {"k-NN organ accuracy"} and set(coords["probe_value"]) == {0.875}
    by_label = pd.read_csv(run / "figures" / "umap_label.csv")
    assert sorted(by_label["sample_id"]) == sorted(r["sample_id"] for r in labelled) and by_label.groupby("label").size().to_dict() == {0: 10, 1: 10}
    xy = by_label[["umap_x", "umap_y"]].to_numpy()
    distances = np.linalg.norm(xy[:, None] - xy[None], axis=2) + np.eye(len(xy)) * 1e9
    assert (by_label["label"].to_numpy()[distances.argmin(1)] == by_label["label"].to_numpy()).all()
    assert set(by_label["probe"]) == {"k-NN label probe AUROC"} and set(by_label["probe_value"]) == {0.9375}
    probes = pd.read_csv(run / "figures" / "probes.csv")
    assert probes[["step", "value"]].to_numpy().tolist() == [[0, 0.5], [40, 0.875]]
    assert (run / "figures" / "umap.pdf").is_file() and (run / "figures" / "umap_label.pdf").is_file()


def test_sample_grid_caption_states_step_sampler_and_fid(tmp_path):
    from tus.data.images import write_grayscale
    from tus.figures.runs import run_kind, write_diffusion_figures

    run = tmp_path / "diffusion"
    (run / "sample_grids").mkdir(parents=True)
    write_grayscale(run / "sample_grids" / "step_0000200.png", np.arange(32 * 48, dtype=np.uint8).reshape(32, 48))
    (run / "config.yaml").write_text("samples:\n  sampler: ddim\n  steps: 25\n")
    assert run_kind(run) == "diffusion"
    write_diffusion_figures(run, fid=123.4)
    caption = pd.read_csv(run / "figures" / "samples.csv").iloc[0]
    assert (caption["step"], caption["sampler"], caption["sampling_steps"], caption["fid"]) == (200, "ddim", 25, 123.4)
    assert (caption["height_px"], caption["width_px"]) == (32, 48)


def test_gradcam_overlay_titles_colour_bar_and_aspect():
    import torch

    from tus.eval.explain import MarkerSensitivity, overlay_figure

    n, h, w = 2, 16, 24
    cams = np.tile(np.linspace(0, 1, w), (n, h, 1))
    result = MarkerSensitivity(
        images=torch.zeros(n, 1, h, w),
        marked=torch.zeros(n, 1, h, w),
        masks=np.zeros((n, h, w), bool),
        cams_clean=cams,
        cams_marked=cams,
        probabilities_clean=np.array([0.83, 0.2]),
        probabilities_marked=np.array([0.4, 0.1]),
        predicted_clean=np.array([1, 0]),
        predicted_marked=np.array([0, 0]),
        target_layer="backbone.layer4",
    )
    figure = overlay_figure(result, ["a/img1.png", "b/img2.png"], labels=[1, 1])
    image_axes = [a for a in figure.axes if a.images]
    assert image_axes[0].get_title() == "img1.png\ntrue 1, pred 1, p(1)=0.83"
    assert image_axes[2].get_title() == "+ markers\ntrue 1, pred 0, p(1)=0.40"
    assert all(a.get_aspect() == 1.0 for a in image_axes)
    colour_bars = [a for a in figure.axes if a.get_ylabel().startswith("Grad-CAM++")]
    assert len(colour_bars) == 1
    # The CAM drawn over the second panel is the CAM itself, on a fixed 0-1 scale.
    heat = image_axes[1].images[1]
    assert np.allclose(heat.get_array(), cams[0]) and heat.get_clim() == (0, 1)


def test_flag_histogram_highlights_the_configured_rule(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from tus.eval.noisy_labels import plot_histogram

    table = pd.DataFrame({"min_exceed": [1, 1, 3, 3], "flagged_in": [0, 1, 0, 1], "samples": [2, 5, 6, 1]})
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: drawn.append(self))
    plot_histogram(table, 1.0, tmp_path / "h.png", min_exceed=3)
    (figure,) = drawn
    titles = [a.get_title() for a in figure.axes]
    assert titles == ["loss > 1 in ≥ 1 epochs", "loss > 1 in ≥ 3 epochs (configured rule)"]
    heights = [[p.get_height() for p in a.patches] for a in figure.axes]
    assert heights == [[2, 5], [6, 1]]
    assert figure.axes[0].patches[0].get_facecolor() != figure.axes[1].patches[0].get_facecolor()


def test_report_redraws_a_studys_forest_plots_against_the_recorded_baseline(tmp_path):
    from tus.figures.runs import write_study_figures
    from tus.stages.report import report

    table = pd.DataFrame(
        {
            "arm": ["ours", "imagenet"],
            "auroc_mean": [85.0, 80.0],
            "auroc_std": [1.5, 2.0],
            "auroc_diff": [5.0, np.nan],
            "auroc_diff_ci_low": [1.0, np.nan],
            "auroc_diff_ci_high": [9.0, np.nan],
            "auroc_p": [0.012, np.nan],
        }
    )
    table.to_csv(tmp_path / "table.csv", index=False)
    first = write_study_figures(tmp_path, table, "imagenet", ["accuracy", "auroc"])
    assert sorted(p.name for p in first) == ["forest_auroc.csv", "forest_auroc.pdf", "forest_auroc.png"]  # no accuracy column
    before = {p.name: p.read_bytes() for p in first}
    (written,) = report([tmp_path]).values()
    assert {p.name: p.read_bytes() for p in written} == before  # the baseline came from the sidecar, not the first row
    assert pd.read_csv(tmp_path / "figures" / "forest_auroc.csv").set_index("arm")["baseline"].to_dict() == {"ours": False, "imagenet": True}


def test_bootstrap_average_precision_is_sklearns_to_the_bit():
    from sklearn.metrics import average_precision_score

    from tus.figures.classification import _average_precision

    rng = np.random.default_rng(0)
    for case in range(300):
        labels = rng.integers(0, 2, int(rng.integers(2, 60)))
        labels[:2] = [0, 1]
        scores = rng.random(labels.size)
        if case % 2:
            scores = np.round(scores, 1)  # tied scores
        assert _average_precision(labels == 1, scores) == float(average_precision_score(labels, scores))


def test_pr_figures_bootstrap_ci_is_patient_bootstrap_of_sklearns_average_precision():
    # The PR figure bootstraps AP on arrays; the reference is the frame-based cluster bootstrap
    # (tus.eval.statistics.patient_bootstrap_ci) of sklearn's average_precision_score, whose
    # replicates are undefined (NaN, skipped) when they hold one class only.
    from sklearn.metrics import average_precision_score

    from tus.eval.statistics import patient_bootstrap_ci

    def ap(replicate: pd.DataFrame) -> float:
        return float(average_precision_score(replicate["label"], replicate["prob"])) if replicate["label"].nunique() == 2 else np.nan

    rng = np.random.default_rng(3)
    rows = 40
    many = pd.DataFrame({"label": rng.integers(0, 2, rows), "prob": rng.random(rows).round(2), "pred": 0, "fold": 0, "seed": 0, "patient_id": [f"p{i // 3}" for i in range(rows)]})
    # Three patients, one of them the only positive: about 30% of replicates hold no positive.
    few = pd.DataFrame({"label": [0, 0, 1, 1, 0, 0, 0], "prob": [0.1, 0.3, 0.6, 0.2, 0.5, 0.3, 0.9], "pred": 0, "fold": 0, "seed": 0, "patient_id": ["a", "a", "b", "b", "c", "c", "c"]})
    for frame in (many, few):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped one-class replicates
            expected = patient_bootstrap_ci(frame, ap, n_boot=200, alpha=0.05, seed=0)
        mean = fig.pr_data(frame, n_boot=200).query("curve == 'mean'").iloc[0]
        assert (mean["auc_ci_low"], mean["auc_ci_high"]) == expected


def test_figure_formats_follow_the_environment_and_refuse_unknown_ones(tmp_path, monkeypatch):
    from tus.figures.style import figure_formats

    monkeypatch.delenv("TUS_FIGURE_FORMATS")
    assert figure_formats() == ("png", "pdf")
    monkeypatch.setenv("TUS_FIGURE_FORMATS", " PNG, svg ,png")
    assert figure_formats() == ("png", "svg")
    result = fig.roc_figure(predictions(), n_boot=10)
    assert sorted(p.name for p in save(result, tmp_path, "roc")) == ["roc.csv", "roc.png", "roc.svg"]
    monkeypatch.setenv("TUS_FIGURE_FORMATS", "png,jpg")
    with pytest.raises(ValueError, match="TUS_FIGURE_FORMATS='png,jpg'"):
        figure_formats()
