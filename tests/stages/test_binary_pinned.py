"""Binary stays exactly as it was: a tiny binary phantom CV's summary, pinned to the last digit.

The numbers were recorded from the code before multi-class labels were added (issue 26), so a
change to the binary path (folds, sampler, loss, metrics, tables, predictions) shows here. If a
deliberate change to the binary recipe moves them, re-record them and say why in the commit.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from tests.stages.test_finetune_cv import tiny_config
from tus.data.phantom import generate_phantom
from tus.stages.finetune_cv import run_cv

METRICS = {
    "accuracy": {"mean": 0.4576719601949056, "std": 0.03750647098866704, "n": 3},
    "f1": {"mean": 0.20000000794728598, "std": 0.3464101752788785, "n": 3},
    "precision": {"mean": 0.14285714427630106, "std": 0.2474358321107509, "n": 3},
    "recall": {"mean": 0.3333333333333333, "std": 0.5773502691896258, "n": 3},
    "auroc": {"mean": 0.6722222169240316, "std": 0.28690559261792636, "n": 3},
}
CI = {
    "accuracy": {"low": 0.17373188405797102, "high": 0.7391304347826086},
    "f1": {"low": 0.0, "high": 0.6923076923076923},
    "precision": {"low": 0.0, "high": 0.8571428571428571},
    "recall": {"low": 0.0, "high": 0.8},
    "auroc": {"low": 0.06902097902097902, "high": 0.904475524475524},
}
BASELINES = {
    "positive_rate": 0.4583333333333333,
    "always_negative": {"accuracy": 0.5416666666666667, "f1": 0.0, "precision": 0.0, "recall": 0.0, "auroc": 0.5},
    "prior_random": {"accuracy": 0.5034722222222223, "f1": 0.4583333333333333, "precision": 0.4583333333333333, "recall": 0.4583333333333333, "auroc": 0.5},
}
TABLE = "# pin: 3-fold patient-grouped CV x 1 seeds\n\n| | Accuracy | F1 | Precision | Recall | AUROC |\n|---|---|---|---|---|---|\n| pin | 45.8 ± 3.8 | 20.0 ± 34.6 | 14.3 ± 24.7 | 33.3 ± 57.7 | 67.2 ± 28.7 |\n| *paper spread* | 45.8 ± 3.8 | 20.0 ± n/a | 14.3 ± n/a | 33.3 ± n/a | 67.2 ± n/a |\n| *95% CI, patients* | [17.4, 73.9] | [0.0, 69.2] | [0.0, 85.7] | [0.0, 80.0] | [6.9, 90.4] |\n| *always negative* | 54.2 | 0.0 | 0.0 | 0.0 | 50.0 |\n| *random (prior-matched)* | 50.3 | 45.8 | 45.8 | 45.8 | 50.0 |\n\nMean ± sample std (%) over 3 of 3 runs; positive = class 1 (45.8% of images).\n*paper spread*: mean ± std (%) as the paper reports them: accuracy's std over all fold x seed runs, the other metrics' std over the per-seed means (sample std, ddof=1; n/a with one seed).\n*95% CI, patients*: 95% percentile bootstrap (1000 resamples of patients, all of a patient's images and runs together) of the test predictions pooled over 3 runs (10 patients).\nModel selection: the last epoch of each run is evaluated on its held-out test fold (no model selection).\n"
FOLD0_PREDICTIONS = "sample_id,label,probability,prediction\nimages/P0000_00.png,0,0.4659058749675751,0\nimages/P0000_01.png,0,0.46825480461120605,0\nimages/P0002_00.png,1,0.46668586134910583,0\nimages/P0002_01.png,1,0.4661201238632202,0\nimages/P0002_02.png,1,0.47020232677459717,0\nimages/P0008_00.png,1,0.47971171140670776,0\nimages/P0008_01.png,1,0.4704378545284271,0\nimages/P0009_00.png,0,0.47036540508270264,0\nimages/P0009_01.png,0,0.47273755073547363,0\n"

# Pinned in float32: precision auto picks bf16 on AMX CPUs, whose rounding depends on the CPU's
# kernels; the pins were recorded where auto gives 32-true, so forcing it changes nothing there.
PINNED_PRECISION = "trainer.precision=32-true"


def test_binary_phantom_cv_summary_is_unchanged(tmp_path: Path):
    paths = generate_phantom(tmp_path / "phantom", num_patients=10, images_per_patient=(2, 3), image_size=32, positive_fraction=0.4, pool_size=0, seed=0)
    run_dir = run_cv(tiny_config(paths.labeled_manifest, tmp_path / "runs", "name=pin", "trainer.max_epochs=1", PINNED_PRECISION))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"] == METRICS
    assert summary["ci"] == CI
    assert summary["baselines"] == BASELINES
    assert (run_dir / "summary.md").read_text().split("\n## Figures")[0] == TABLE
    # Probabilities to float32's last digits vary with the CPU's kernels (AVX512 against AVX2
    # sum in another order: 3e-8 here); everything else in the file is exact.
    recorded = pd.read_csv(run_dir / "runs" / "fold0-seed0" / "predictions.csv")
    pinned = pd.read_csv(io.StringIO(FOLD0_PREDICTIONS))
    pd.testing.assert_frame_equal(recorded.drop(columns="probability"), pinned.drop(columns="probability"))
    np.testing.assert_allclose(recorded["probability"], pinned["probability"], rtol=0, atol=1e-6)
