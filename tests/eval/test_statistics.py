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


def _arm(rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """Scores of one arm over 3 folds x 4 seeds under the corrected test's own model.

    Nadeau & Bengio's correction assumes runs correlate with rho = n_test / (n_train + n_test)
    (1/3 here). A random effect shared by all runs of an arm, with variance tau^2 = s^2 / 2 next to
    a per-run noise s^2, gives paired differences exactly that correlation: 2 tau^2 / (2 tau^2 + 2 s^2).
    """
    noise = 0.02
    return 0.8 + shift + rng.normal(0.0, noise / math.sqrt(2)) + rng.normal(0.0, noise, FOLDS * SEEDS)


def test_compare_arms_p_values_are_uniform_without_a_true_difference() -> None:
    p_values, naive_p = [], []
    for repetition in range(200):
        rng = np.random.default_rng(repetition)
        baseline, arm = _arm(rng), _arm(rng)
        # Shuffled rows: pairing must go by (fold, seed), not by position.
        arm_runs = _runs(arm).sample(frac=1.0, random_state=repetition)
        result = compare_arms(_runs(baseline), arm_runs, "f1", N_TRAIN, N_TEST, n_boot=200)
        p_values.append(result["p"])
        naive_p.append(stats.ttest_rel(arm, baseline).pvalue)
    p_values = np.array(p_values)
    assert np.mean(p_values < 0.05) < 0.12
    assert 0.35 < p_values.mean() < 0.65
    # The uncorrected paired t-test on the same data is far too liberal: the reason for the correction.
    assert np.mean(np.array(naive_p) < 0.05) > 0.3


def test_compare_arms_detects_a_large_shift() -> None:
    rng = np.random.default_rng(7)
    baseline, arm = _arm(rng), _arm(rng, shift=0.2)
    result = compare_arms(_runs(baseline), _runs(arm), "f1", N_TRAIN, N_TEST)

    diffs = arm - baseline
    assert result["p"] < 0.01
    assert result["t"] > 0
    assert result["n_pairs"] == FOLDS * SEEDS
    assert result["mean_diff"] == pytest.approx(diffs.mean())
    assert result["arm_mean"] - result["baseline_mean"] == pytest.approx(diffs.mean())
    assert (result["t"], result["p"]) == pytest.approx(nadeau_bengio_ttest(diffs, N_TRAIN, N_TEST))
    # Percentile bootstrap of a mean of 12 values: close to mean +- 1.96 * plug-in standard error.
    assert result["ci_low"] < result["mean_diff"] < result["ci_high"]
    normal_width = 2 * 1.96 * diffs.std(ddof=0) / math.sqrt(len(diffs))
    assert result["ci_high"] - result["ci_low"] == pytest.approx(normal_width, rel=0.25)
    # Seeded: the same call gives the same interval.
    again = compare_arms(_runs(baseline), _runs(arm), "f1", N_TRAIN, N_TEST)
    assert (again["ci_low"], again["ci_high"]) == (result["ci_low"], result["ci_high"])


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
    values = []
    for draw in draws:
        replicate = pd.concat([frame[frame["patient_id"] == patients[i]] for i in draw])
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
    from tus.eval.statistics import METRIC_FNS, patient_bootstrap_ci, patient_bootstrap_cis

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
    fast = patient_bootstrap_cis(frame, list(METRIC_FNS), n_boot=300, seed=3)
    for name, metric in METRIC_FNS.items():
        np.testing.assert_allclose(fast[name], patient_bootstrap_ci(frame, metric, n_boot=300, seed=3), rtol=0, atol=1e-12, err_msg=name)
