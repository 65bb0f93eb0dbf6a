"""Per-epoch counting of loss exceedances (thesis Fig. 3.2) against per-draw counting."""

from __future__ import annotations

import pandas as pd
import pytest

from tus.eval.noisy_labels import FlaggingRule, LossTableError, epoch_means, exceedances, flag_samples, histogram


def rows(run: str, sample: str, draws: list[tuple[int, float]], label: int = 1) -> list[dict]:
    """One recorded row per (epoch, loss) draw, steps numbered in order."""
    return [{"run": run, "sample_id": sample, "epoch": e, "step": i, "label": label, "loss": loss} for i, (e, loss) in enumerate(draws)]


def test_three_draws_in_one_epoch_are_one_exceedance():
    losses = pd.DataFrame(rows("a", "s", [(0, 1.2), (0, 1.2), (0, 1.2)]))
    assert exceedances(losses, 1.0)["exceedances"].tolist() == [1]
    assert exceedances(losses, 1.0, "per_draw")["exceedances"].tolist() == [3]
    # per draw the sample is suspicious (3 >= 3), per epoch it is not
    assert not flag_samples(losses, FlaggingRule()).loc["s", "flagged"]
    assert flag_samples(losses, FlaggingRule(counting="per_draw")).loc["s", "flagged"]


def test_one_exceedance_in_each_of_three_epochs_counts_three():
    losses = pd.DataFrame(rows("a", "s", [(0, 1.2), (1, 1.2), (2, 1.2), (3, 0.4)]))
    assert exceedances(losses, 1.0)["exceedances"].tolist() == [3]
    assert flag_samples(losses, FlaggingRule()).loc["s", "flagged"]
    # with repeat draws the epoch's mean decides: (1.5 + 0.2) / 2 < 1 < (1.5 + 0.9) / 2
    repeats = pd.DataFrame(rows("a", "s", [(0, 1.5), (0, 0.2), (1, 0.1), (1, 2.5), (2, 1.1), (2, 1.5), (2, 0.9)]))
    assert exceedances(repeats, 1.0)["exceedances"].tolist() == [2]
    assert exceedances(repeats.assign(loss=repeats["loss"].where(repeats["loss"] != 0.2, 0.9)), 1.0)["exceedances"].tolist() == [3]


def test_epoch_means_are_per_run_epoch_and_sample():
    losses = pd.DataFrame(
        [
            *rows("a", "s", [(0, 1.0), (0, 2.0), (1, 4.0)]),
            *rows("b", "s", [(0, 3.0)]),
            *rows("a", "t", [(0, 0.5), (0, 0.7)], label=0),
        ]
    )
    means = epoch_means(losses).set_index(["run", "epoch", "sample_id"])
    assert means["loss"].to_dict() == {("a", 0, "s"): 1.5, ("a", 0, "t"): pytest.approx(0.6), ("a", 1, "s"): 4.0, ("b", 0, "s"): 3.0}
    assert means["draws"].to_dict() == {("a", 0, "s"): 2, ("a", 0, "t"): 2, ("a", 1, "s"): 1, ("b", 0, "s"): 1}
    assert means.loc[("a", 0, "t"), "label"] == 0


def test_per_epoch_counting_does_not_favour_the_oversampled_class():
    # A positive drawn 3x per epoch, a negative once; both have one bad draw in each of 3 epochs.
    positive = [(e, loss) for e in range(3) for loss in (1.2, 1.2, 1.2)]
    negative = [(e, 1.2) for e in range(3)]
    losses = pd.DataFrame([*rows("a", "pos", positive, 1), *rows("a", "neg", negative, 0)])
    per_epoch = exceedances(losses, 1.0).set_index("sample_id")["exceedances"].to_dict()
    per_draw = exceedances(losses, 1.0, "per_draw").set_index("sample_id")["exceedances"].to_dict()
    assert per_epoch == {"neg": 3, "pos": 3}
    assert per_draw == {"neg": 3, "pos": 9}
    assert histogram(losses, 1.0, (5,))["samples"].tolist() == [2, 0]
    assert histogram(losses, 1.0, (5,), counting="per_draw")["samples"].tolist() == [1, 1]


def test_a_table_without_epochs_is_refused_per_epoch_but_counts_per_draw():
    losses = pd.DataFrame(rows("a", "s", [(0, 1.2), (0, 1.2), (0, 1.2)])).drop(columns="epoch")
    with pytest.raises(LossTableError, match="no 'epoch' column.*counting: per_draw"):
        flag_samples(losses, FlaggingRule())
    assert flag_samples(losses, FlaggingRule(counting="per_draw")).loc["s", "exceedances"] == 3


def test_unknown_counting_is_refused():
    with pytest.raises(ValueError, match="per_epoch, per_draw"):
        FlaggingRule(counting="per_step")
