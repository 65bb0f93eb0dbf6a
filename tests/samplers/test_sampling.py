"""``tus sample``: samplers, reproducibility, resumable output folders."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import tus.stages.sample as sampling
from tests.methods.test_iddpm import TINY_UNET
from tus.cli.sample import main
from tus.data.images import read_grayscale
from tus.data.manifest import load_manifest
from tus.losses.gaussian_diffusion import NoiseSchedule
from tus.methods.iddpm import ProcessConfig, UNetExport, build_unet, export_stem, save_unet_export
from tus.samplers import sample_images
from tus.samplers.solvers import diffusers_scheduler
from tus.stages.sample import generate

# 50 training steps keep the full ancestral chain cheap; the samplers do not depend on T.
STEPS = 50


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    unet = build_unet(TINY_UNET)
    run_dir = tmp_path_factory.mktemp("run")
    return save_unet_export(unet, UNetExport(unet=TINY_UNET, process=ProcessConfig(num_timesteps=STEPS), step=5), export_stem(run_dir, 5))


@pytest.fixture(scope="module")
def unet(export):
    return sampling.load_sampling_model(export)[0]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_sampling_is_reproducible_and_writes_exactly_n(export, tmp_path):
    first = generate(export, tmp_path / "a", 5, sampler="respaced", steps=10, seed=3, batch_size=2, progress=False)
    generate(export, tmp_path / "b", 5, sampler="respaced", steps=10, seed=3, batch_size=2, progress=False)
    generate(export, tmp_path / "c", 5, sampler="respaced", steps=10, seed=4, batch_size=2, progress=False)
    images = folder_bytes(tmp_path / "a")
    assert sorted(images) == [f"{i:06d}.png" for i in range(5)]
    assert images == folder_bytes(tmp_path / "b")
    assert all(images[name] != other for name, other in folder_bytes(tmp_path / "c").items())
    assert len(set(images.values())) == 5
    array = read_grayscale(tmp_path / "a" / "000000.png")
    assert array.shape == (16, 16) and array.dtype == np.uint8

    manifest = pd.read_csv(first)
    assert list(manifest.columns) == ["index", "seed", "sampler", "steps", "path", "sample_id"]
    assert manifest["index"].tolist() == list(range(5)) and set(manifest["sampler"]) == {"respaced"}
    assert manifest["seed"].nunique() == 5 and set(manifest["steps"]) == {10}
    assert len(load_manifest(first, require_labels=False)) == 5


def test_interrupted_sampling_resumes_to_the_uninterrupted_result(export, tmp_path, monkeypatch):
    generate(export, tmp_path / "straight", 6, sampler="ddim", steps=4, seed=1, batch_size=2, progress=False)

    real_append = sampling.append_manifest_rows
    calls = []

    def crash_on_second_batch(manifest, indices, settings, *labels):
        calls.append(list(indices))
        if len(calls) == 3:  # reconciliation, batch 0, then batch 1 dies before its rows
            raise KeyboardInterrupt
        real_append(manifest, indices, settings, *labels)

    monkeypatch.setattr(sampling, "append_manifest_rows", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate(export, tmp_path / "resumed", 6, sampler="ddim", steps=4, seed=1, batch_size=2, progress=False)
    monkeypatch.setattr(sampling, "append_manifest_rows", real_append)
    folder = tmp_path / "resumed"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}

    generate(export, folder, 6, sampler="ddim", steps=4, seed=1, batch_size=2, progress=False)
    assert folder_bytes(folder) == folder_bytes(tmp_path / "straight")
    assert all(folder.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in before.items())
    assert sorted(pd.read_csv(folder / "manifest.csv")["index"]) == list(range(6))
    assert not list(folder.glob(".*"))  # no partial files left behind


def test_images_do_not_depend_on_the_batch(unet):
    schedule = NoiseSchedule.cosine(STEPS)
    seeds = [11, 12, 13]
    together = sample_images(unet, schedule, "respaced", 8, seeds)
    alone = torch.cat([sample_images(unet, schedule, "respaced", 8, [s]) for s in seeds])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)


def test_samplers(unet):
    schedule = NoiseSchedule.cosine(STEPS)
    seeds = [0, 1]
    ddpm = sample_images(unet, schedule, "ddpm", None, seeds)
    # Respacing with every step is the ancestral sampler itself.
    torch.testing.assert_close(sample_images(unet, schedule, "respaced", STEPS, seeds), ddpm)
    strided = sample_images(unet, schedule, "respaced", 10, seeds)
    assert not torch.allclose(strided, ddpm)
    for sampler in ("ddim", "dpm"):
        images = sample_images(unet, schedule, sampler, 5, seeds)
        assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
        assert images.min() >= -1 and images.max() <= 1
        scheduler = diffusers_scheduler(sampler, schedule)
        torch.testing.assert_close(scheduler.alphas_cumprod.double(), schedule.alphas_cumprod, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="respaced"):
        sample_images(unet, schedule, "ddpm", 10, seeds)


class OracleUNet(torch.nn.Module):
    """The exact prediction for data that is always ``target``: noise = (x - sqrt(ab) target) / sqrt(1 - ab), v = -1."""

    def __init__(self, target: torch.Tensor, schedule: NoiseSchedule):
        super().__init__()
        self.target = target
        self.alphas_cumprod = schedule.alphas_cumprod.float()
        self.config = SimpleNamespace(in_channels=1, sample_size=target.shape[-1])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        alpha_bar = self.alphas_cumprod[torch.as_tensor(t).reshape(-1).expand(x.shape[0])].reshape(-1, 1, 1, 1)
        noise = (x - alpha_bar.sqrt() * self.target) / (1 - alpha_bar).sqrt()
        return SimpleNamespace(sample=torch.cat([noise, -torch.ones_like(noise)], dim=1))


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("respaced", 7), ("ddim", 5), ("dpm", 5)])
def test_every_sampler_recovers_the_data_with_an_exact_model(sampler, steps):
    # Any mix-up of respaced and training timesteps, or of the output halves, breaks this.
    schedule = NoiseSchedule.cosine(STEPS)
    target = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    images = sample_images(OracleUNet(target, schedule), schedule, sampler, steps, [1, 2])
    torch.testing.assert_close(images, target.expand(2, 1, 4, 4), atol=1e-4, rtol=0)


def test_folder_settings_are_checked(export, tmp_path):
    generate(export, tmp_path / "a", 1, sampler="ddim", steps=3, seed=0, progress=False)
    with pytest.raises(ValueError, match="seed=0, not 1"):
        generate(export, tmp_path / "a", 2, sampler="ddim", steps=3, seed=1, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "note.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a tus sample folder"):
        generate(export, foreign, 1, sampler="ddim", steps=3, progress=False)


def test_command_line_reads_a_run_directory(export, tmp_path):
    run_dir = export.parents[1]
    out = tmp_path / "samples"
    assert main(["--checkpoint", str(run_dir), "--n", "3", "--out", str(out), "--sampler", "dpm", "--steps", "3", "--batch-size", "2", "--no-progress"]) == 0
    assert len(list(out.glob("*.png"))) == 3
    assert (out / "sampling.json").read_text().count(export.name) == 1


def test_a_second_writer_on_one_output_folder_is_refused(tmp_path):
    import os

    import pytest

    from tus.runs import LOCK_FILE, RunDirError, RunLock

    out = tmp_path / "samples"
    out.mkdir()
    (out / LOCK_FILE).write_text(str(os.getppid()))  # a live process (pytest's parent) holds it
    with pytest.raises(RunDirError, match=f"pid {os.getppid()}"):
        RunLock(out).acquire()
    (out / LOCK_FILE).write_text("999999999")  # a process that is gone: the lock is taken over
    with RunLock(out):
        assert (out / LOCK_FILE).read_text() == str(os.getpid())
    assert not (out / LOCK_FILE).exists()
