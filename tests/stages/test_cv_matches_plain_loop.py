"""Issue 28's guard for the speed work: what ``tus finetune-cv`` records for a fixed seed is what a
plain PyTorch loop computes from the same data stream, model and optimiser. The loop below is
written out by hand (no Trainer, no callbacks: no memory-format choice, checkpoint thread,
one-pass test predictions, deferred imports or figures), so a speed-up that changed a number
(a skipped step, a reordered random draw, a format switch mid-run, predictions from another
pass) fails here. The folds' predictions and test metrics are compared."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from tests.helpers import make_labeled_dataset
from tests.stages.test_finetune_cv import tiny_config
from tus.data.datamodules import LabeledDataModule
from tus.data.manifest import load_manifest
from tus.data.seeding import derive_seed
from tus.hardware import resolve_precision
from tus.methods.classifier import FineTuneModule
from tus.stages.finetune_cv import backbone_for_inputs, cv_folds, run_cv

EPOCHS = 2


def plain_fold(config, frame: pd.DataFrame, folds: np.ndarray, fold: int, seed: int) -> tuple[np.ndarray, int]:
    """Test-fold probabilities of the positive class after a hand-written training loop, and
    the number of optimiser steps it took."""
    L.seed_everything(seed, workers=True)  # as the stage seeds each run, before building it
    datamodule = LabeledDataModule(config.data, frame, folds, fold, seed)
    module = FineTuneModule(backbone_for_inputs(config.model, config.data.image_size), config.optim)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    optimizer = module.build_optimizers(EPOCHS * len(loader), len(loader))
    assert isinstance(optimizer, torch.optim.Optimizer)  # optim.schedule=constant: no scheduler
    bf16 = resolve_precision("auto", "cpu").startswith("bf16")
    module.train()
    steps = 0
    for epoch in range(EPOCHS):
        if epoch > 0:
            # An epoch's stream is a function of (seed, epoch): sampler, augmentation and torch's
            # generator reseeded from derive_seed(seed, epoch) (the stage's resumable streams).
            reseed = derive_seed(seed, epoch) % (2**32)
            torch.manual_seed(reseed)
            loader.generator.manual_seed(reseed)
            datamodule.train_set.transform.reseed(reseed)
        for batch in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(module(batch["image"]).float(), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    module.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        probabilities = torch.cat([module(b["image"]).float().softmax(1)[:, 1] for b in datamodule.test_dataloader()])
    return probabilities.double().numpy(), steps


def test_cv_records_what_a_plain_loop_computes(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path / "data", patients=18, per_patient=2, positive_every=3)
    # channels_last stays 'auto' (the default): a fit shorter than the timing trial runs NCHW untimed.
    config = tiny_config(manifest, tmp_path / "runs", f"trainer.max_epochs={EPOCHS}", "figures=false", "record_losses=false", "gradcam.enabled=false")
    assert config.trainer.channels_last == "auto"
    run_dir = run_cv(config)
    frame = load_manifest(manifest)
    folds = cv_folds(config, frame)
    runs = pd.read_csv(run_dir / "runs.csv").set_index("fold")
    for fold in range(3):
        recorded = pd.read_csv(run_dir / "runs" / f"fold{fold}-seed0" / "predictions.csv")
        expected, steps = plain_fold(config, frame, folds, fold, seed=0)
        test_rows = frame[folds == fold].reset_index(drop=True)
        assert recorded["sample_id"].astype(str).tolist() == test_rows["sample_id"].astype(str).tolist()
        np.testing.assert_allclose(recorded["probability"], expected, rtol=0, atol=1e-6)
        metrics = json.loads((run_dir / "runs" / f"fold{fold}-seed0" / "metrics.json").read_text())
        assert metrics["steps"] == steps
        labels = test_rows["label"].astype(int).to_numpy()
        if 0 < labels.sum() < len(labels):
            assert runs.loc[fold, "auroc"] == np.float64(metrics["auroc"])
            assert abs(metrics["auroc"] - roc_auc_score(labels, expected)) < 1e-6
