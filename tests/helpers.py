"""Builders of tiny on-disk datasets for tests, the overrides of a tiny CV on them, and the TCP
port of a test's DDP rendezvous."""

from __future__ import annotations

import json
import random
import socket
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


def tiny_cv_overrides(manifest: Path, out: Path, *, epochs: int, more: tuple[str, ...] = ()) -> list[str]:
    """``tus finetune-cv`` arguments: the CPU recipe on ``manifest`` at 32 px, one seed, into ``out``."""
    return [
        "--config",
        "finetune/cpu",
        f"--data.manifest={manifest}",
        f"--output_root={out}",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--data.cache_images=false",
        f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false",
        # Runs compared bit for bit may start together: a memory format measured by each under
        # the other's load could differ, and the formats' results differ in the last bits.
        "--trainer.channels_last=false",
        "--seeds=[0]",
        "--logging.wandb=false",
        *more,
    ]


def finished_wandb_records(folder: Path, timeout_s: float = 120.0) -> list:
    """The records of every offline W&B run under ``folder``, once each run's log holds its
    ``exit`` record: W&B's service may still be writing a log after ``run.finish()`` returned
    (a loaded machine left a CV's fold runs without their artifact records for a moment)."""
    import time

    from tus import tracking

    deadline = time.monotonic() + timeout_s
    while True:
        logs = sorted(Path(folder).rglob("offline-run-*/run-*.wandb"))
        kinds = {log: [r.WhichOneof("record_type") for r in tracking.offline_records(log.parent)] for log in logs}
        if logs and all("exit" in k for k in kinds.values()):
            return tracking.offline_records(folder)
        assert time.monotonic() < deadline, f"offline W&B runs not finished after {timeout_s:.0f} s: { ({str(log): k[-3:] for log, k in kinds.items()}) }"
        time.sleep(0.2)


def free_port() -> int:
    """A free TCP port for a test's DDP rendezvous (``MASTER_PORT``), chosen below the kernel's
    ephemeral range. Why: the usual ``bind(("", 0))`` returns an ephemeral port, which stays free
    only until the next outgoing connection takes it as its source port, and the other xdist
    worker's DDP processes open many: in a clean clone rank 0 of the srun-style launch waited 300 s
    for a rank 1 that had joined another rendezvous (stop 31). The kernel never hands out a port
    below the range by itself, so only another explicit choice can collide, and the choice is
    random (not the seeded ``random`` module: two workers with one seed would pick alike)."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.is_file() else 32768  # Linux's default
    choose = random.SystemRandom()
    for _ in range(200):
        port = choose.randrange(max(1024, low - 12000), low)
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port below {low} after 200 tries")


def ran_in_bf16(fold_run: Path) -> bool:
    """Whether a fold run trained and tested under bf16 autocast (``precision: auto`` picks it on
    GPUs and on CPUs with AMX), as its ``runtime.json`` records."""
    return json.loads((fold_run / "runtime.json").read_text())["precision"].startswith("bf16")


def predict_atol(fold_run: Path) -> float:
    """How far ``tus predict`` (float32) may be from the fold's own ``predictions.csv``: 1e-5
    after a float32 run; after a bf16 run its bf16 rounding (8-bit mantissa: ~0.4% relative a
    step), ~2e-3 on these tiny models' probabilities, within 1e-2."""
    return 1e-2 if ran_in_bf16(fold_run) else 1e-5
