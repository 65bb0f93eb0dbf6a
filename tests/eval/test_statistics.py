"""tus.eval.statistics against hand computations: spreads, corrected t-test, arm comparison, patient bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tus.eval.statistics import (
    METRIC_FNS,
    compare_arms,
    format_p,
    nadeau_bengio_ttest,
    paper_spread,
    patient_bootstrap_ci,
    significance_marker,
)

FOLDS, SEEDS = 3, 4
# 3-fold CV: each run trains on 2/3 and tests on 1/3 of the patients, n_test/n_train = 0.5.
N_TRAIN, N_TEST = 200, 100


def test_paper_spread_matches_hand_computation_on_3x2_table() -> None:
    runs = pd.DataFrame(
        {
            "fold": [0, 1, 2, 0, 1, 2],
            "seed": [0, 0, 0, 1, 1, 1],
            "accuracy": [0.80, 0.70, 0.90, 0.60, 0.80, 0.70],
            "f1": [0.5, 0.6, 0.7, 0.8, 1.0, 0.6],
        }
    )
    spread = paper_spread(runs, ["accuracy", "f1"])

    # accuracy: mean 0.75, deviations +-0.05 (x4) and +-0.15 (x2) -> var = 0.055 / 5.
    assert spread["accuracy"]["mean"] == pytest.approx(0.75)
    assert spread["accuracy"]["std"] == pytest.approx(math.sqrt(0.055 / 5))
    assert spread["accuracy"]["sample_std"] == pytest.approx(math.sqrt(0.055 / 5))
    assert spread["accuracy"]["std_over"] == "runs"
    # f1: seed means 0.6 and 0.8 -> std (ddof=1) = 0.2 / sqrt(2); over all runs the deviations from
    # 0.7 are -0.2, -0.1, 0, 0.1, 0.3, -0.1 -> var = 0.16 / 5.
    assert spread["f1"]["mean"] == pytest.approx(0.7)
    assert spread["f1"]["std"] == pytest.approx(0.2 / math.sqrt(2))
    assert spread["f1"]["std_over"] == "seed_means"
    assert spread["f1"]["sample_std"] == pytest.approx(math.sqrt(0.16 / 5))
    assert (spread["f1"]["n_runs"], spread["f1"]["n_seeds"]) == (6, 2)

    with pytest.raises(ValueError, match="auroc"):
        paper_spread(runs, ["auroc"])


def test_nadeau_bengio_ttest_matches_hand_computation() -> None:
    diffs = [0.02, -0.01, 0.03, 0.00, 0.015, 0.025]
    j = len(diffs)
    mean = sum(diffs) / j
    variance = sum((d - mean) ** 2 for d in diffs) / (j - 1)
    t_ref = mean / math.sqrt((1 / j + N_TEST / N_TRAIN) * variance)
    p_ref = 2 * stats.t.sf(abs(t_ref), df=j - 1)

    t, p = nadeau_bengio_ttest(diffs, N_TRAIN, N_TEST)
    assert t == pytest.approx(t_ref, rel=1e-12)
    assert p == pytest.approx(p_ref, rel=1e-12)
    # Symmetric in the sign of the differences.
    t_neg, p_neg = nadeau_bengio_ttest([-d for d in diffs], N_TRAIN, N_TEST)
    assert (t_neg, p_neg) == pytest.approx((-t_ref, p_ref))
    # Without overlap between runs (n_test/n_train -> 0) it is the ordinary one-sample t-test.
    plain = stats.ttest_1samp(diffs, 0.0)
    assert nadeau_bengio_ttest(diffs, 1e15, 1e-15) == pytest.approx((plain.statistic, plain.pvalue))


def test_nadeau_bengio_ttest_zero_variance_and_bad_input() -> None:
    assert nadeau_bengio_ttest([0.0, 0.0, 0.0], N_TRAIN, N_TEST) == (0.0, 1.0)
    assert nadeau_bengio_ttest([0.01, 0.01, 0.01], N_TRAIN, N_TEST) == (math.inf, 0.0)
    assert nadeau_bengio_ttest([-0.01, -0.01], N_TRAIN, N_TEST) == (-math.inf, 0.0)
    with pytest.raises(ValueError):
        nadeau_bengio_ttest([0.1], N_TRAIN, N_TEST)
    with pytest.raises(ValueError):
        nadeau_bengio_ttest([0.1, 0.2], 0, N_TEST)


def _runs(values: np.ndarray, metric: str = "f1") -> pd.DataFrame:
    folds, seeds = np.meshgrid(np.arange(FOLDS), np.arange(SEEDS), indexing="ij")
    return pd.DataFrame({"fold": folds.ravel(), "seed": seeds.ravel(), metric: values})


# Fixed scores of two arms over 3 folds x 4 seeds (fold-major, as _runs lays them out).
BASELINE_F1 = np.array([0.71, 0.64, 0.69, 0.75, 0.66, 0.70, 0.73, 0.68, 0.62, 0.70, 0.72, 0.67])
ARM_F1 = np.array([0.74, 0.69, 0.70, 0.79, 0.66, 0.76, 0.75, 0.71, 0.66, 0.73, 0.73, 0.72])


def test_compare_arms_equals_the_corrected_test_written_out() -> None:
    # Shuffled rows: pairing must go by (fold, seed), not by position.
    result = compare_arms(_runs(BASELINE_F1), _runs(ARM_F1).sample(frac=1.0, random_state=3), "f1", N_TRAIN, N_TEST)
    d = ARM_F1 - BASELINE_F1
    j = len(d)
    mean = d.sum() / j
    variance = ((d - mean) ** 2).sum() / (j - 1)
    # Nadeau & Bengio (2003): t = mean / sqrt((1/J + n_test/n_train) * var), J - 1 df.
    se = math.sqrt((1 / j + N_TEST / N_TRAIN) * variance)
    t = mean / se
    assert result["t"] == pytest.approx(t, rel=1e-12)
    assert result["p"] == pytest.approx(2 * stats.t.sf(abs(t), df=j - 1), rel=1e-10)
    half = stats.t.ppf(0.975, df=j - 1) * se
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((mean - half, mean + half), rel=1e-12)
    assert (result["mean_diff"], result["n_pairs"], result["test"]) == (pytest.approx(mean), 12, "nadeau_bengio")
    assert result["arm_mean"] - result["baseline_mean"] == pytest.approx(mean)
    # The uncorrected paired t-test on the same runs (scipy) gives a far smaller p-value.
    assert stats.ttest_rel(ARM_F1, BASELINE_F1).pvalue < result["p"] / 10
    # A shift of 0.2 in every run (with the same spread) is clearly significant.
    assert compare_arms(_runs(BASELINE_F1), _runs(ARM_F1 + 0.2), "f1", N_TRAIN, N_TEST)["p"] < 0.001


def test_compare_arms_names_unpaired_and_repeated_runs() -> None:
    baseline = _runs(np.full(FOLDS * SEEDS, 0.8))
    arm = _runs(np.full(FOLDS * SEEDS, 0.8))
    arm = arm[~((arm["fold"] == 2) & (arm["seed"] == 3))]
    extra = pd.DataFrame({"fold": [5], "seed": [0], "f1": [0.8]})
    with pytest.raises(ValueError, match=r"missing from arm \[\(2, 3\)\], missing from baseline \[\(5, 0\)\]"):
        compare_arms(baseline, pd.concat([arm, extra]), "f1", N_TRAIN, N_TEST)
    with pytest.raises(ValueError, match=r"repeats \(fold, seed\) pairs \[\(0, 0\)\]"):
        compare_arms(pd.concat([baseline, baseline.iloc[:1]]), baseline, "f1", N_TRAIN, N_TEST)
    # Identical arms: zero difference, p = 1, a degenerate interval at 0.
    result = compare_arms(baseline, baseline, "f1", N_TRAIN, N_TEST)
    assert (result["mean_diff"], result["p"], result["ci_low"], result["ci_high"]) == (0.0, 1.0, 0.0, 0.0)


def _folds_csv(assignment: dict[int, list[list[str]]], labels: dict[str, int] | None = None) -> pd.DataFrame:
    """A folds.csv with a seed column from {seed: [fold 0 ids, fold 1 ids, ...]}."""
    rows = [{"sample_id": i, "patient_id": f"p{i}", "label": (labels or {}).get(i, 0), "fold": f, "seed": s} for s, folds in assignment.items() for f, ids in enumerate(folds) for i in ids]
    return pd.DataFrame(rows)


def test_compare_arms_refuses_arms_tested_on_different_images_in_one_line() -> None:
    from tus.eval.statistics import UnpairedRunsError

    runs = pd.DataFrame({"fold": [0, 1, 0, 1], "seed": [0, 0, 1, 1], "f1": [0.7, 0.6, 0.65, 0.7]})
    split = {0: [["a", "b"], ["c", "d"]], 1: [["a", "c"], ["b", "d"]]}
    # The arm re-split its own manifest for seed 1: b and c swapped folds.
    resplit = {0: [["a", "b"], ["c", "d"]], 1: [["a", "b"], ["c", "d"]]}
    with pytest.raises(UnpairedRunsError) as error:
        compare_arms(runs, runs, "f1", 2, 2, baseline_folds=_folds_csv(split), arm_folds=_folds_csv(resplit), names=("complete", "filtered"))
    message = str(error.value)
    assert "\n" not in message and "'complete'" in message and "'filtered'" in message
    assert "2 of 4 runs" in message and "fold 0, seed 1" in message
    # A filtered arm that dropped image d from the test folds is not paired either.
    dropped = {s: [[i for i in fold if i != "d"] for fold in folds] for s, folds in split.items()}
    with pytest.raises(UnpairedRunsError, match=r"1 image\(s\) only in 'complete' \(e.g. d\)"):
        compare_arms(runs, runs, "f1", 2, 2, baseline_folds=_folds_csv(split), arm_folds=_folds_csv(dropped), names=("complete", "filtered"))
    # The same images with one label flipped: paired on images, and the change is counted.
    result = compare_arms(runs, runs, "f1", 2, 2, baseline_folds=_folds_csv(split), arm_folds=_folds_csv(split, {"c": 1}), names=("complete", "flipped"))
    assert result["label_changes"] == 1 and result["n_pairs"] == 4
    # One split without a seed column pairs with every seed's runs of the same split.
    one = _folds_csv({0: split[0]}).drop(columns="seed")
    assert compare_arms(runs[runs["seed"] == 0], runs[runs["seed"] == 0], "f1", 2, 2, baseline_folds=one, arm_folds=_folds_csv({0: split[0]}))["n_pairs"] == 2


def _paired_predictions(rng: np.random.Generator, n_patients: int = 14, seeds: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pooled test predictions of two arms on one split (2 folds) over ``seeds`` seeds."""
    sizes = rng.integers(1, 4, n_patients)
    patients = np.repeat([f"q{i:02d}" for i in rng.permutation(n_patients)], sizes)
    labels = np.repeat(np.arange(n_patients) % 2, sizes)
    fold = np.repeat(np.arange(n_patients) % 2, sizes)
    frames = {}
    for name, skill in (("base", 0.6), ("arm", 0.75)):
        rows = []
        for seed in range(seeds):
            prob = np.clip(np.where(labels == 1, skill, 1 - skill) + rng.normal(0, 0.25, len(labels)), 0, 1)
            rows.append(
                pd.DataFrame({"sample_id": [f"x{i}" for i in range(len(labels))], "patient_id": patients, "label": labels, "prob": prob, "pred": (prob >= 0.5).astype(int), "fold": fold, "seed": seed})
            )
        frames[name] = pd.concat(rows, ignore_index=True)
    return frames["base"], frames["arm"]


@pytest.mark.parametrize("metric", ["f1", "auroc"])
def test_pooled_prediction_comparison_equals_a_bootstrap_by_hand(metric) -> None:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    from tus.eval.statistics import compare_pooled_predictions

    base, arm = _paired_predictions(np.random.default_rng(4))
    fn = {
        "accuracy": lambda f: accuracy_score(f["label"], f["pred"]),
        "f1": lambda f: f1_score(f["label"], f["pred"], zero_division=0),
        "auroc": lambda f: roc_auc_score(f["label"], f["prob"]) if f["label"].nunique() == 2 else math.nan,
    }[metric]
    n_boot, seed = 100, 9
    # By hand: draw patients (sorted ids) with replacement, stack both arms' rows of the drawn
    # patients, take the difference of the metric, then quantiles and the two tail counts.
    patients = np.unique(base["patient_id"])
    draws = np.random.default_rng(seed).integers(0, len(patients), (n_boot, len(patients)))
    rows_of = [np.flatnonzero(base["patient_id"].to_numpy() == patient) for patient in patients]
    diffs = []
    for draw in draws:
        rows = np.concatenate([rows_of[i] for i in draw])
        diffs.append(fn(arm.iloc[rows]) - fn(base.iloc[rows]))  # the arms' rows are in the same order
    diffs = np.array(diffs)
    diffs = diffs[~np.isnan(diffs)]
    low, high = np.quantile(diffs, [0.025, 0.975])
    p = min(1.0, 2 * (min((diffs <= 0).sum(), (diffs >= 0).sum()) + 1) / (len(diffs) + 1))

    result = compare_pooled_predictions(base, arm.sample(frac=1.0, random_state=1), metric, n_boot=n_boot, seed=seed)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    assert result["p"] == pytest.approx(p)
    assert result["mean_diff"] == pytest.approx(fn(arm) - fn(base))
    assert (result["n_pairs"], result["patients"], result["test"]) == (4, 14, "patient_bootstrap")


def test_pooled_prediction_comparison_refuses_unpaired_predictions() -> None:
    from tus.eval.statistics import UnpairedRunsError, compare_pooled_predictions

    base, arm = _paired_predictions(np.random.default_rng(0))
    with pytest.raises(UnpairedRunsError, match=r"arms 'complete' and 'filtered' have different test predictions \(2 row\(s\) in one only.*only in 'complete'"):
        compare_pooled_predictions(base, arm[arm["sample_id"] != "x0"], "accuracy", n_boot=50, names=("complete", "filtered"))
    same = compare_pooled_predictions(base, base, "accuracy", n_boot=50)
    assert (same["mean_diff"], same["ci_low"], same["ci_high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)


def test_metric_functions_match_hand_counts() -> None:
    # TP = 2, FN = 1, FP = 1, TN = 1.
    frame = pd.DataFrame({"label": [1, 1, 0, 0, 1], "pred": [1, 0, 0, 1, 1], "prob": [0.9, 0.4, 0.2, 0.6, 0.8]})
    assert METRIC_FNS["accuracy"](frame) == pytest.approx(3 / 5)
    assert METRIC_FNS["precision"](frame) == pytest.approx(2 / 3)
    assert METRIC_FNS["recall"](frame) == pytest.approx(2 / 3)
    assert METRIC_FNS["f1"](frame) == pytest.approx(2 / 3)
    # Positive-over-negative pairs: 0.9 > both, 0.4 > 0.2, 0.8 > both -> 5 of 6.
    assert METRIC_FNS["auroc"](frame) == pytest.approx(5 / 6)
    assert math.isnan(METRIC_FNS["auroc"](frame[frame["label"] == 1]))
    assert METRIC_FNS["precision"](frame.assign(pred=0)) == 0.0


def _reference_patient_bootstrap(frame: pd.DataFrame, metric, n_boot: int, alpha: float, seed: int):
    """Plain loop: draw patients (sorted ids) with replacement, stack all their rows, recompute, quantiles."""
    patients = np.unique(frame["patient_id"])
    draws = np.random.default_rng(seed).integers(0, len(patients), (n_boot, len(patients)))
    rows_of = [np.flatnonzero(frame["patient_id"].to_numpy() == patient) for patient in patients]
    values = []
    for draw in draws:
        replicate = frame.iloc[np.concatenate([rows_of[i] for i in draw])]
        values.append(metric(replicate))
    values = np.array(values)
    values = values[~np.isnan(values)]
    return tuple(np.quantile(values, [alpha / 2, 1 - alpha / 2]))


def _clustered_predictions(rng: np.random.Generator, n_patients: int = 30, rows: int = 10) -> pd.DataFrame:
    """Each patient's images are all classified right or all wrong: errors cluster by patient."""
    patient_correct = rng.random(n_patients) < 0.7
    labels = np.repeat(np.arange(n_patients) % 2, rows)
    correct = np.repeat(patient_correct, rows)
    return pd.DataFrame(
        {
            "sample_id": np.arange(n_patients * rows),
            "patient_id": np.repeat([f"p{i:02d}" for i in rng.permutation(n_patients)], rows),
            "label": labels,
            "pred": np.where(correct, labels, 1 - labels),
        }
    )


def test_patient_bootstrap_moves_patients_as_units() -> None:
    frame = _clustered_predictions(np.random.default_rng(0))
    accuracy = METRIC_FNS["accuracy"]
    point = accuracy(frame)

    low, high = patient_bootstrap_ci(frame, accuracy, n_boot=400, seed=3)
    row_low, row_high = patient_bootstrap_ci(frame.assign(patient_id=frame["sample_id"]), accuracy, n_boot=400, seed=3)
    assert low <= point <= high
    assert row_low <= point <= row_high
    # 30 independent patients vs 300 "independent" rows: about sqrt(10) times wider.
    assert high - low > 2 * (row_high - row_low)
    # Every replicate holds whole patients of 10 all-right or all-wrong rows: accuracy is k / 30.
    assert (low * 30) == pytest.approx(round(low * 30)) and (high * 30) == pytest.approx(round(high * 30))


def test_patient_bootstrap_equals_hand_coded_reference() -> None:
    rng = np.random.default_rng(1)
    # Unequal rows per patient and ids out of order, so patient order and row stacking matter.
    sizes = [1, 5, 2, 8, 3, 1, 4, 6]
    ids = np.repeat(["d", "b", "h", "a", "f", "c", "g", "e"], sizes)
    labels = rng.integers(0, 2, len(ids))
    frame = pd.DataFrame(
        {
            "sample_id": np.arange(len(ids)),
            "patient_id": ids,
            "label": labels,
            "pred": np.where(rng.random(len(ids)) < 0.75, labels, 1 - labels),
            "prob": rng.random(len(ids)),
        }
    )
    f1 = METRIC_FNS["f1"]
    assert patient_bootstrap_ci(frame, f1, n_boot=150, alpha=0.1, seed=5) == pytest.approx(_reference_patient_bootstrap(frame, f1, n_boot=150, alpha=0.1, seed=5))


def test_patient_bootstrap_skips_single_class_replicates_for_auroc() -> None:
    # Four patients, one class each: with 4 draws, a replicate is one-class with probability 1/8.
    frame = pd.DataFrame(
        {
            "sample_id": np.arange(8),
            "patient_id": ["a", "a", "b", "b", "c", "c", "d", "d"],
            "label": [1, 1, 1, 1, 0, 0, 0, 0],
            "prob": [0.9, 0.3, 0.7, 0.6, 0.4, 0.8, 0.1, 0.2],
        }
    )
    frame["pred"] = (frame["prob"] > 0.5).astype(int)
    auroc = METRIC_FNS["auroc"]
    with pytest.warns(UserWarning, match="skipped"):
        interval = patient_bootstrap_ci(frame, auroc, n_boot=200, seed=2)
    assert not any(math.isnan(v) for v in interval)
    assert interval == pytest.approx(_reference_patient_bootstrap(frame, auroc, n_boot=200, alpha=0.05, seed=2))


def test_format_p_and_markers() -> None:
    cases = {
        0.03: "p=0.03",
        0.5: "p=0.50",
        1.0: "p=1.00",
        0.004: "p=0.004",
        0.0004: "p<0.001",
        0.0496: "p<0.05",
        0.00996: "p<0.01",
        0.051: "p=0.05",
        math.nan: "p=n/a",
    }
    assert {p: format_p(p) for p in cases} == cases
    markers = [significance_marker(p) for p in (0.0004, 0.004, 0.03, 0.05, 0.2, math.nan)]
    assert markers == ["***", "**", "*", "", "", ""]


def test_vectorised_bootstrap_equals_the_per_replicate_metrics():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    from tus.eval.statistics import patient_bootstrap_cis

    rng = np.random.default_rng(5)
    rows = 90
    frame = pd.DataFrame(
        {
            "patient_id": rng.integers(0, 25, rows).astype(str),
            "label": rng.integers(0, 2, rows),
            # rounded so that ties between scores occur, as they do with saved probabilities
            "prob": np.round(rng.random(rows), 1),
        }
    )
    frame["pred"] = (frame["prob"] > 0.5).astype(int)
    fast = patient_bootstrap_cis(frame, list(METRIC_FNS), n_boot=120, seed=3)
    by_sklearn = {
        "accuracy": lambda f: accuracy_score(f["label"], f["pred"]),
        "f1": lambda f: f1_score(f["label"], f["pred"], zero_division=0),
        "precision": lambda f: precision_score(f["label"], f["pred"], zero_division=0),
        "recall": lambda f: recall_score(f["label"], f["pred"], zero_division=0),
        "auroc": lambda f: roc_auc_score(f["label"], f["prob"]) if f["label"].nunique() == 2 else math.nan,
    }
    for name in METRIC_FNS:
        np.testing.assert_allclose(fast[name], _reference_patient_bootstrap(frame, by_sklearn[name], n_boot=120, alpha=0.05, seed=3), rtol=0, atol=1e-12, err_msg=name)
