"""K > 2 classes: a flagged label is relabelled to the models' most probable other class."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import make_labeled_dataset
from tus.eval.noisy_labels import FlaggingRule, LossTableError, read_losses, relabel_to_most_probable_other, write_report

NAMES = ["benign", "malignant", "normal"]


def test_relabel_picks_the_most_probable_class_other_than_the_label():
    probabilities = pd.DataFrame({"prob_a": [0.7, 0.1, 0.2], "prob_b": [0.2, 0.5, 0.4], "prob_c": [0.1, 0.4, 0.4]}, index=["x", "y", "z"])
    # x: its own class a is the most probable, so b; y: c (b is its own); z: tie b/c -> b (lower index).
    assert relabel_to_most_probable_other(pd.Series([0, 1, 0]), pd.Series(["x", "y", "z"]), probabilities).tolist() == [1, 2, 1]
    with pytest.raises(LossTableError, match="no out-of-fold class probabilities .* for 1 flagged sample"):
        relabel_to_most_probable_other(pd.Series([0]), pd.Series(["w"]), probabilities)


def test_write_report_relabels_flagged_names_and_keeps_them_names(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path / "data", patients=6, per_patient=1)
    frame = pd.read_csv(manifest)
    frame["label"] = [NAMES[i % 3] for i in range(len(frame))]
    frame.to_csv(manifest, index=False)
    ids = frame["path"].tolist()
    run = tmp_path / "cv" / "runs" / "fold0-seed0"
    run.mkdir(parents=True)
    (tmp_path / "cv" / "config.yaml").write_text(f"data:\n  label_names: {NAMES}\n")
    labels = [i % 3 for i in range(len(ids))]
    # Samples 0 and 4 have a high loss in every epoch: flagged.
    rows = [{"sample_id": s, "step": e, "epoch": e, "label": labels[i], "loss": 3.0 if i in (0, 4) else 0.1} for e in range(3) for i, s in enumerate(ids)]
    pd.DataFrame(rows).to_csv(run / "losses.csv", index=False)
    probs = {"prob_benign": [0.1] * 6, "prob_malignant": [0.3] * 6, "prob_normal": [0.6] * 6}
    probs["prob_normal"][4], probs["prob_benign"][4] = 0.2, 0.7  # sample 4 (malignant): benign most probable
    pd.DataFrame({"sample_id": ids, "label": labels, "prediction": 2, **probs}).to_csv(run / "predictions.csv", index=False)
    (run / "metrics.json").write_text("{}")
    report = write_report(read_losses([run / "losses.csv"]), manifest, FlaggingRule(threshold=1.0, min_exceed=2, min_fraction=0.5), tmp_path / "out")
    assert report["flagged"] == 2
    flipped = pd.read_csv(tmp_path / "out" / "manifest_flipped.csv")
    # Sample 0: benign -> normal (most probable other); sample 4: malignant -> benign.
    assert flipped["label"].tolist() == ["normal", "malignant", "normal", "benign", "benign", "normal"]
    assert pd.read_csv(tmp_path / "out" / "manifest_filtered.csv")["label"].tolist() == ["malignant", "normal", "benign", "normal"]
