"""The class-conditional improved DDPM: label dropout, p_uncond = 1 ignores labels, configs stay unconditional by default."""

from __future__ import annotations

from dataclasses import replace

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
