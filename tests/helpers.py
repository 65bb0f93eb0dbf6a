"""Builders of tiny on-disk datasets for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tus.data.images import write_grayscale


def make_labeled_dataset(root: Path, *, patients: int = 12, per_patient: int = 2, size: int = 32, positive_every: int = 3, seed: int = 0) -> Path:
    """A labelled manifest whose positives carry a bright square: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = int(p % positive_every == 0)
        for i in range(per_patient):
            image = rng.integers(40, 90, size=(size, size), dtype=np.uint8)
            if label:
                image[size // 4 : size // 2, size // 4 : size // 2] = 230
            name = f"images/p{p:03d}_{i}.png"
            write_grayscale(root / name, image)
            rows.append({"path": name, "patient_id": f"P{p:03d}", "label": label, "organ": "testicle"})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
