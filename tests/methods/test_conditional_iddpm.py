"""The class-conditional improved DDPM: label dropout, p_uncond = 1 ignores labels, configs stay unconditional by default."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.methods.test_iddpm import TINY_UNET, disk_images
from tus.methods.iddpm import DiffusionModule, EmaConfig, OptimConfig, ProcessConfig, UNetConfig, build_unet, null_label, training_labels

CONDITIONAL = replace(TINY_UNET, num_classes=2)


def trained(p_uncond: float, labels: torch.Tensor, steps: int = 4) -> DiffusionModule:
    torch.manual_seed(0)
    module = DiffusionModule(CONDITIONAL, ProcessConfig(num_timesteps=100, p_uncond=p_uncond), OptimConfig(lr=1e-2), EmaConfig(), seed=3)
    module.log_dict = lambda *args, **kwargs: None  # no Trainer to log to
    optimizer = module.configure_optimizers()
    images = torch.from_numpy(disk_images(len(labels), 16)).float().div(127.5).sub(1)[:, None]
    for step in range(steps):
        loss = module.training_step({"image": images, "label": labels}, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module


def outputs(unet, label: int) -> torch.Tensor:
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return unet(x, torch.tensor([5, 50, 95]), class_labels=torch.full((3,), label)).sample


def test_with_p_uncond_one_the_model_ignores_labels():
    labels = torch.tensor([0, 1, 1, 0, -1, 1])
    ignoring = trained(1.0, labels).unet
    torch.testing.assert_close(outputs(ignoring, 0), outputs(ignoring, 1), rtol=0, atol=0)
    # Whatever labels the batches carried, the weights are the same.
    relabelled = trained(1.0, torch.tensor([1, 1, 0, 0, 0, -1])).unet
    for (name, a), b in zip(ignoring.state_dict().items(), relabelled.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # The control: trained on its labels, the model tells them apart.
    listening = trained(0.0, labels).unet
    assert not torch.allclose(outputs(listening, 0), outputs(listening, 1))


def test_label_dropout_rate_and_unlabelled_images():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 5000)
    dropped = training_labels(labels, 2, 0.15, generator)
    assert set(dropped.unique().tolist()) == {0, 1, 2}
    rate = (dropped == 2).float().mean().item()
    assert abs(rate - 0.15) < 4 * (0.15 * 0.85 / len(labels)) ** 0.5  # binomial 4-sigma
    kept = dropped != 2
    assert torch.equal(dropped[kept], labels[kept])  # a label is kept or nulled, never changed
    assert training_labels(torch.tensor([-1, -1]), 2, 0.0, generator).tolist() == [2, 2]
    with pytest.raises(ValueError, match=r"label 2 is outside 0..1"):
        training_labels(torch.tensor([0, 2]), 2, 0.1, generator)


def test_unconditional_stays_the_default():
    assert UNetConfig().num_classes is None and ProcessConfig().p_uncond is None
    assert "num_class_embeds" not in TINY_UNET.diffusers_config()
    unet = build_unet(CONDITIONAL)
    assert unet.class_embedding.num_embeddings == 3 and null_label(unet) == 2
    assert null_label(build_unet(TINY_UNET)) is None
    with pytest.raises(ValueError, match="set unet.num_classes"):
        DiffusionModule(TINY_UNET, ProcessConfig(p_uncond=0.1), OptimConfig(), EmaConfig())
    with pytest.raises(ValueError, match="p_uncond must be in"):
        ProcessConfig(p_uncond=1.5)


def test_conditional_run_exports_a_model_that_samples_labels(tmp_path):
    from tests.methods.test_iddpm import disk_manifest, tiny_config
    from tus.cli.sample import main as sample_main
    from tus.config import ConfigError
    from tus.data.images import UsageError
    from tus.data.manifest import load_manifest
    from tus.methods.iddpm import latest_export
    from tus.stages.diffusion import run_diffusion

    manifest = disk_manifest(tmp_path / "data")  # labels 0, 1, 0, 1, ...
    run = run_diffusion(tiny_config(tmp_path, manifest, **{"unet.num_classes": 2, "process.p_uncond": 0.2, "process.num_timesteps": 20, "trainer.max_steps": 3}))
    assert '"images_per_label": {\n    "0": 6,\n    "1": 6' in (run / "pool.json").read_text()
    export = latest_export(run)
    common = ["--checkpoint", str(export), "--sampler", "respaced", "--steps", "4", "--no-progress"]
    assert sample_main([*common, "--n", "3", "--out", str(tmp_path / "one"), "--label", "1", "--guidance", "2.0"]) == 0
    rows = load_manifest(tmp_path / "one" / "manifest.csv", require_labels=True, require_patients=False)
    assert rows["label"].tolist() == [1, 1, 1] and set(rows["guidance"].astype(float)) == {2.0}
    # A class mix: image i takes the label of row i mod 12 of the manifest.
    assert sample_main([*common, "--n", "14", "--out", str(tmp_path / "mix"), "--labels-from", str(manifest)]) == 0
    mixed = load_manifest(tmp_path / "mix" / "manifest.csv", require_labels=True, require_patients=False)
    assert mixed.sort_values("index")["label"].tolist() == [i % 12 % 2 for i in range(14)]
    # Unconditional sampling of the same model: no label column.
    assert sample_main([*common, "--n", "2", "--out", str(tmp_path / "none")]) == 0
    assert "label" not in (tmp_path / "none" / "manifest.csv").read_text().splitlines()[0]
    with pytest.raises(UsageError, match="--label 2 is outside 0..1"):
        sample_main([*common, "--n", "1", "--out", str(tmp_path / "bad"), "--label", "2"])
    with pytest.raises(UsageError, match="--guidance needs --label"):
        sample_main([*common, "--n", "1", "--out", str(tmp_path / "bad"), "--guidance", "1"])
    # Labels outside the classes fail before training, naming the manifest.
    with pytest.raises(ConfigError, match=r"manifest.csv: label 1 is outside 0..0"):
        run_diffusion(tiny_config(tmp_path, manifest, **{"unet.num_classes": 1}))


def squares(count: int, rng: np.random.Generator, size: int = 8, side: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """``side`` px squares at random places on a ``size`` px mid-grey field: bright (+0.8) for label 1, dark (-0.8) for label 0."""
    images = np.zeros((count, 1, size, size), np.float32)
    labels = rng.integers(0, 2, count)
    for i in range(count):
        y, x = rng.integers(0, size - side + 1, 2)
        images[i, 0, y : y + side, x : x + side] = 0.8 if labels[i] else -0.8
    return torch.from_numpy(images), torch.from_numpy(labels)


@pytest.mark.slow
def test_a_tiny_conditional_model_draws_the_class_it_is_asked_for():
    """The issue's acceptance test: trained on bright vs dark squares, the model draws the asked-for class.

    Sized to take about 25 s of CPU time (88 s wall on the shared 2-core machine at load average 13): 8 px images,
    a width-16 two-level U-Net, 100 diffusion timesteps, 200 steps of batch 32 at lr 1e-2, DDIM with 20 steps.
    At 16 px and batch 16, 300 steps reached only 59% (w = 0) and 81% (w = 2). With this size, seeds 0-2 gave
    67-84% at w = 0 and 94-100% at w = 2: the label steers the samples, and guidance sharpens it.
    """
    from tus.samplers import sample_images

    torch.manual_seed(0)
    unet = replace(CONDITIONAL, sample_size=8, attention_resolutions=(4,))
    module = DiffusionModule(unet, ProcessConfig(num_timesteps=100, p_uncond=0.2), OptimConfig(lr=1e-2), EmaConfig(decay=0.99, warmup=True), seed=0)
    module.log_dict = lambda *args, **kwargs: None
    optimizer = module.configure_optimizers()
    rng = np.random.default_rng(0)
    for step in range(200):
        images, labels = squares(32, rng)
        loss = module.training_step({"image": images, "label": labels}, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.ema.update(module.unet, step=step)
    wanted = torch.tensor([0, 1] * 32)
    ema = module.ema.module.eval()

    def agreement(guidance: float) -> float:
        samples = sample_images(ema, module.schedule, "ddim", 20, list(range(len(wanted))), labels=wanted.tolist(), guidance=guidance)
        # The trivial classifier, independent of the model: brighter than the mid-grey field on average is "bright".
        predicted = (samples.mean(dim=(1, 2, 3)) > 0).long()
        return (predicted == wanted).float().mean().item()

    conditional, guided = agreement(0.0), agreement(2.0)
    assert guided > 0.9, f"{guided:.0%} of guided samples show the class asked for (conditional, w = 0: {conditional:.0%})"
    # An unconditional model would agree on about half; guidance moves samples further towards their class.
    assert 0.6 < conditional <= guided
