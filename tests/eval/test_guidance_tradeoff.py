"""Label faithfulness of conditional samples under a classifier, and the faithfulness-vs-FID figure over w."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.eval.test_synthetic_metrics import PixelExtractor
from tus.data.images import UsageError, write_grayscale
from tus.figures.guidance import tradeoff_data, tradeoff_figure
from tus.figures.style import save
from tus.methods.classifier import FineTuneModule, save_finetuned
from tus.methods.configs import FineTuneOptimConfig
from tus.models.configs import BackboneConfig
from tus.stages.synthetic import label_faithfulness, run_metrics


@pytest.fixture(autouse=True)
def png_and_pdf(monkeypatch):
    """These tests check both formats (the suite writes PNG only, tests/conftest.py)."""
    monkeypatch.setenv("TUS_FIGURE_FORMATS", "png,pdf")


@pytest.fixture
def always_positive(tmp_path):
    """A classifier whose head ignores the image and always answers class 1 (weights 0, bias (0, 5))."""
    module = FineTuneModule(BackboneConfig(name="test_resnet", init="scratch"), FineTuneOptimConfig())
    with torch.no_grad():
        module.head.weight.zero_()
        module.head.bias.copy_(torch.tensor([0.0, 5.0]))
    return save_finetuned(module, tmp_path / "fold0-seed0", image_size=16)


def samples(folder, labels):
    rng = np.random.default_rng(0)
    for index in range(len(labels)):
        write_grayscale(folder / f"{index:06d}.png", rng.integers(0, 255, size=(16, 16), dtype=np.uint8))
    pd.DataFrame({"index": range(len(labels)), "path": [f"{i:06d}.png" for i in range(len(labels))], "label": labels, "guidance": 2.0}).to_csv(folder / "manifest.csv", index=False)
    return folder


def test_faithfulness_is_the_share_classified_as_the_conditioning_label(always_positive, tmp_path):
    folder = samples(tmp_path / "samples", [1, 0, 1, 1, 0])
    faith = label_faithfulness(always_positive, folder)
    # The classifier says 1 for everything: faithful exactly on the three label-1 samples.
    assert faith["accuracy"] == pytest.approx(3 / 5) and faith["num_images"] == 5
    assert faith["per_class"] == {"0": {"num_images": 2, "accuracy": 0.0}, "1": {"num_images": 3, "accuracy": 1.0}}
    real = tmp_path / "real.csv"
    real_folder = samples(tmp_path / "real", [0, 1, 0, 1, 0, 1])
    pd.read_csv(real_folder / "manifest.csv").assign(path=lambda f: "real/" + f["path"]).to_csv(real, index=False)
    metrics = run_metrics(real, folder, extractor=PixelExtractor(), prc_k=1, faithfulness_model=always_positive)
    assert metrics["faithfulness"]["accuracy"] == pytest.approx(0.6)
    samples(tmp_path / "bad", [2, 0])
    with pytest.raises(UsageError, match=r"label\(s\) \[2\] outside the classifier's 2 classes"):
        label_faithfulness(always_positive, tmp_path / "bad")


def test_tradeoff_figure_plots_faithfulness_against_fid_in_order_of_w(tmp_path):
    rows = [
        {"guidance": 4.0, "fid": 80.0, "faithfulness": 0.95, "precision": 0.9, "recall": 0.2, "num_generated": 100},
        {"guidance": 0.0, "fid": 40.0, "faithfulness": 0.6, "precision": 0.7, "recall": 0.6, "num_generated": 100},
        {"guidance": 1.0, "fid": 45.0, "faithfulness": 0.8, "precision": 0.8, "recall": 0.5, "num_generated": 100},
    ]
    data = tradeoff_data(rows)
    assert data["guidance"].tolist() == [0.0, 1.0, 4.0]
    result = tradeoff_figure(data)
    (line,) = result.figure.axes[0].get_lines()
    assert line.get_xdata().tolist() == [40.0, 45.0, 80.0] and line.get_ydata().tolist() == pytest.approx([60.0, 80.0, 95.0])
    assert [t.get_text() for t in result.figure.axes[0].texts] == ["w=0", "w=1", "w=4"]
    written = save(result, tmp_path, "guidance_tradeoff")
    assert sorted(p.name for p in written) == ["guidance_tradeoff.csv", "guidance_tradeoff.pdf", "guidance_tradeoff.png"]
    assert pd.read_csv(tmp_path / "guidance_tradeoff.csv")["faithfulness"].tolist() == [0.6, 0.8, 0.95]


def test_guidance_sweep_samples_scores_and_plots_each_scale(always_positive, tmp_path):
    from tests.methods.test_iddpm import disk_manifest, tiny_config
    from tus.stages.diffusion import run_diffusion
    from tus.stages.synthetic import run_guidance_sweep

    manifest = disk_manifest(tmp_path / "data")  # 12 images, labels 0, 1, 0, 1, ...
    run = run_diffusion(tiny_config(tmp_path, manifest, **{"unet.num_classes": 2, "process.num_timesteps": 20, "trainer.max_steps": 2}))
    table = run_guidance_sweep(run, manifest, always_positive, tmp_path / "sweep", guidances=[2.0, 0.0], n=6, steps=4, extractor=PixelExtractor())
    assert table["guidance"].tolist() == [0.0, 2.0] and table["num_generated"].tolist() == [6, 6]
    # Labels cycle 0, 1, ... through the manifest's rows; the classifier always says 1: half are faithful.
    assert table["faithfulness"].tolist() == [0.5, 0.5]
    for w in ("w0", "w2"):
        written = pd.read_csv(tmp_path / "sweep" / w / "manifest.csv")
        assert written["label"].tolist() == [0, 1, 0, 1, 0, 1] and set(written["guidance"]) == {float(w[1:])}
    assert pd.read_csv(tmp_path / "sweep" / "sweep.csv")["fid"].tolist() == pytest.approx(table["fid"].tolist())
    assert (tmp_path / "sweep" / "guidance_tradeoff.pdf").is_file() and (tmp_path / "sweep" / "guidance_tradeoff.png").is_file()
    # Each sample folder names its generator's run and what its pool left out (nothing here: refused by fine-tuning).
    record = json.loads((tmp_path / "sweep" / "w0" / "generator.json").read_text())
    assert record["run_dir"] == str(run.resolve()) and record["exclusion"] == {"mode": "none"}
