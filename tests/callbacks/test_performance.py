"""ChannelsLast callback: same outputs as NCHW, batches converted in place, no-op without convs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tus.callbacks.performance import ChannelsLast, batch_images_to_channels_last

CHANNELS_LAST = torch.channels_last


def is_nhwc(tensor: torch.Tensor) -> bool:
    # A (N, C, 1, 1) or C == 1 tensor is contiguous in both formats; the test shapes avoid that.
    return tensor.is_contiguous(memory_format=CHANNELS_LAST) and not tensor.is_contiguous()


class Views(Dataset):
    """Four samples: an image, two augmented views of it, a label and an id."""

    def __init__(self, image_size: int = 12):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(4, 3, image_size, image_size, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        return {"image": image, "views": [image.flip(-1), image * 0.5], "label": index % 2, "sample_id": f"s{index}"}


class Recorder(L.LightningModule):
    """Trains ``net`` on image + both views; records the layout every step sees."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.layouts: list[tuple[bool, ...]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _seen(self, batch: dict) -> None:
        self.layouts.append(tuple(is_nhwc(t) for t in (batch["image"], *batch["views"])))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._seen(batch)
        outputs = [self(t) for t in (batch["image"], *batch["views"])]
        return sum(nn.functional.cross_entropy(o, batch["label"]) for o in outputs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._seen(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._seen(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._seen(batch)
        return self(batch["image"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def patch_net() -> nn.Module:
    """Patchify + MLP, like a ViT's stem: no spatial convolution."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8 * 3 * 3, 2))


def run(net: nn.Module, callbacks: list) -> tuple[Recorder, torch.Tensor]:
    """One training batch, then a validate, test and predict pass over the same loader."""
    module = Recorder(net)
    loader = DataLoader(Views(), batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        deterministic=True,
    )
    trainer.fit(module, train_dataloaders=loader)
    trainer.validate(module, dataloaders=loader, verbose=False)
    trainer.test(module, dataloaders=loader, verbose=False)
    predictions = torch.cat(trainer.predict(module, dataloaders=loader))
    return module, predictions


@pytest.mark.parametrize("enabled", [True, "auto"])
def test_conv_model_runs_nhwc_with_nchw_results(enabled):
    reference, expected = run(conv_net(), [])
    callback = ChannelsLast(enabled)
    module, predictions = run(conv_net(), [callback])
    assert callback.active
    assert reference.layouts == [(False, False, False)] * 4
    assert module.layouts == [(True, True, True)] * 4  # fit, validate, test, predict
    assert is_nhwc(module.net[0].weight) and is_nhwc(module.net[3].weight)
    # One SGD step from the same weights lands on the same weights, and predictions agree.
    for (name, after), before in zip(module.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(predictions, expected, rtol=1e-4, atol=1e-5)
    # An export (state_dict, made contiguous as tus's savers do) loads into an NCHW model.
    fresh = conv_net()
    fresh.load_state_dict({k: v.contiguous() for k, v in module.net.state_dict().items()})
    torch.testing.assert_close(fresh.eval()(Views().images), predictions, rtol=1e-4, atol=1e-5)


def test_model_without_spatial_convs_is_left_alone():
    _, expected = run(patch_net(), [])
    callback = ChannelsLast(True)
    module, predictions = run(patch_net(), [callback])
    assert not callback.active
    assert module.layouts == [(False, False, False)] * 4
    assert module.net[0].weight.is_contiguous()
    assert torch.equal(predictions, expected)


def test_disabled_does_nothing_to_a_conv_model():
    callback = ChannelsLast(False)
    module, _ = run(conv_net(), [callback])
    assert not callback.active and module.layouts == [(False, False, False)] * 4
    assert module.net[0].weight.is_contiguous()


def test_batch_conversion_touches_only_4d_float_tensors():
    image = torch.randn(2, 3, 5, 5)
    mask = torch.zeros(2, 3, 5, 5, dtype=torch.uint8)
    vector = torch.randn(2, 3)
    batch = {"image": image, "views": [image.clone(), vector], "mask": mask, "ids": ["a", "b"], "pair": (image, 1)}
    same = batch_images_to_channels_last(batch)
    assert same is batch
    assert is_nhwc(batch["image"]) and is_nhwc(batch["views"][0]) and is_nhwc(batch["pair"][0])
    assert batch["views"][1] is vector and batch["mask"] is mask and batch["ids"] == ["a", "b"]
    assert torch.equal(batch["image"], image) and batch["pair"][1] == 1


def test_rejects_unknown_setting():
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        ChannelsLast("yes")
