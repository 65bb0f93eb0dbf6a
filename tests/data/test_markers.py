from types import SimpleNamespace

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch

from tus.callbacks.markers import MarkerInjector
from tus.data.markers import MARKER_TYPES, MarkerConfig, MarkerInsertion, draw_markers, inject_markers_into_batch

MEAN, STD = 0.5, 0.25


def speckle_image(seed: int, shape=(96, 128)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 180, size=shape, dtype=np.uint8)


def normalised_batch(seed: int, count: int = 4, size: int = 64) -> torch.Tensor:
    # Arbitrary floats, most of which are not (v/255 - mean)/std for any integer v: a
    # round trip through uint8 would change them.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, size, size, generator=generator)


def test_draw_markers_only_touches_masked_pixels_and_not_the_input():
    image = speckle_image(0)
    original = image.copy()
    marked, mask = draw_markers(image, np.random.default_rng(1))
    np.testing.assert_array_equal(image, original)
    assert mask.dtype == bool and mask.shape == image.shape
    assert mask.sum() > 0
    np.testing.assert_array_equal(marked[~mask], original[~mask])
    assert marked.dtype == np.uint8 and marked.shape == image.shape
    # Every drawn pixel carries a marker gray level from the default intensity range.
    assert marked[mask].min() >= 200


def test_draw_markers_is_deterministic_for_a_seed():
    image = speckle_image(0)
    first = draw_markers(image, np.random.default_rng(7))
    second = draw_markers(image, np.random.default_rng(7))
    other = draw_markers(image, np.random.default_rng(8))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert (first[1] != other[1]).any()


@pytest.mark.parametrize("marker_type", MARKER_TYPES)
@pytest.mark.parametrize("shape", [(64, 64), (128, 128), (48, 160)])
def test_every_marker_type_draws_something(marker_type, shape):
    config = MarkerConfig(types=(marker_type,), min_count=1, max_count=1)
    image = np.zeros(shape, dtype=np.uint8)
    for seed in range(10):
        marked, mask = draw_markers(image, np.random.default_rng(seed), config)
        assert mask.sum() >= 3, (marker_type, shape, seed)
        assert (marked[mask] >= 200).all()


def test_marker_config_ranges_are_respected():
    config = MarkerConfig(types=("cross_plus",), min_count=3, max_count=3, intensity_range=(230, 231), size_range=(0.1, 0.1), thickness_range=(1, 1))
    marked, mask = draw_markers(np.zeros((100, 100), np.uint8), np.random.default_rng(0), config)
    assert set(np.unique(marked[mask]).tolist()) <= {230, 231}
    # Three 1-px plus signs with arms of 5 px cover at most 3 * 21 pixels.
    assert 0 < mask.sum() <= 63


def test_marker_config_rejects_bad_values():
    with pytest.raises(ValueError, match="types"):
        MarkerConfig(types=("laser",))
    with pytest.raises(ValueError, match="min_count"):
        MarkerConfig(min_count=5, max_count=2)
    with pytest.raises(ValueError, match="intensity"):
        MarkerConfig(intensity_range=(200, 300))
    assert MarkerConfig(types=["text"]).types == ("text",)


def test_draw_markers_rejects_multichannel_input():
    with pytest.raises(ValueError, match="uint8"):
        draw_markers(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0))


def test_marker_insertion_compose_seed_is_reproducible_and_draws_per_image():
    images = [speckle_image(seed) for seed in range(4)]

    def run():
        pipeline = A.Compose([MarkerInsertion(config=MarkerConfig(), p=1.0)], seed=0)
        return [pipeline(image=image)["image"] for image in images]

    first, second = run(), run()
    for a, b, source in zip(first, second, images):
        np.testing.assert_array_equal(a, b)
        assert a.shape == source.shape and a.dtype == np.uint8
    masks = [a != source for a, source in zip(first, images)]
    assert all(mask.any() for mask in masks)
    assert all((masks[i] != masks[i + 1]).any() for i in range(3))

    other_seed = A.Compose([MarkerInsertion(p=1.0)], seed=1)
    assert any((other_seed(image=image)["image"] != a).any() for image, a in zip(images, first))


def test_marker_insertion_handles_channel_last_and_probability():
    image = speckle_image(3)
    flat = A.Compose([MarkerInsertion(p=1.0)], seed=5)(image=image)["image"]
    with_channel = A.Compose([MarkerInsertion(p=1.0)], seed=5)(image=image[:, :, None])["image"]
    assert with_channel.shape == (*image.shape, 1)
    np.testing.assert_array_equal(with_channel[:, :, 0], flat)
    never = A.Compose([MarkerInsertion(p=0.0)], seed=5)
    np.testing.assert_array_equal(never(image=image)["image"], image)


def test_marker_insertion_accepts_config_dict_and_keeps_the_dataclass():
    transform = MarkerInsertion(config={"types": ["text"], "max_count": 1}, p=1.0)
    assert transform.config == MarkerConfig(types=("text",), max_count=1)
    assert isinstance(MarkerInsertion(config=MarkerConfig(min_count=2)).config, MarkerConfig)
    with pytest.raises(TypeError, match="uint8"):
        A.Compose([transform], seed=0)(image=np.zeros((32, 32), np.float32))


def test_batch_injection_keeps_unmasked_pixels_bit_identical():
    images = normalised_batch(0)
    before = images.clone()
    marked, masks = inject_markers_into_batch(images, np.random.default_rng(0), MarkerConfig(), MEAN, STD)
    torch.testing.assert_close(images, before, rtol=0, atol=0)
    assert masks.dtype == torch.bool and masks.shape == images.shape
    assert bool(masks.view(4, -1).any(dim=1).all())
    assert torch.equal(marked[~masks], images[~masks])
    gray_levels = (marked[masks] * STD + MEAN) * 255
    assert torch.allclose(gray_levels, gray_levels.round(), atol=1e-3)
    assert float(gray_levels.min()) >= 200 - 1e-3


def test_batch_injection_draws_each_image_independently():
    images = normalised_batch(1)[:1].repeat(4, 1, 1, 1)
    _, masks = inject_markers_into_batch(images, np.random.default_rng(3), MarkerConfig(), MEAN, STD)
    assert all(not torch.equal(masks[i], masks[j]) for i in range(4) for j in range(i + 1, 4))
    # The draw does not depend on pixel content: another image in slot 1 changes nothing
    # for the other slots.
    other = images.clone()
    other[1] = normalised_batch(2)[1]
    _, other_masks = inject_markers_into_batch(other, np.random.default_rng(3), MarkerConfig(), MEAN, STD)
    assert torch.equal(other_masks, masks)


def test_batch_injection_probability_zero_is_identity():
    images = normalised_batch(4)
    marked, masks = inject_markers_into_batch(images, np.random.default_rng(0), probability=0.0)
    assert torch.equal(marked, images)
    assert not bool(masks.any())


def test_callback_marks_only_configured_stages_in_place():
    injector = MarkerInjector(stages=("val", "test"), seed=0)
    trainer = SimpleNamespace(current_epoch=0)
    train_batch = {"image": normalised_batch(5), "label": torch.zeros(4)}
    untouched = train_batch["image"].clone()
    injector.on_train_batch_start(trainer, None, train_batch, 0)
    assert torch.equal(train_batch["image"], untouched)
    assert "marker_mask" not in train_batch

    val_batch = {"image": normalised_batch(5)}
    storage = val_batch["image"].data_ptr()
    injector.on_validation_batch_start(trainer, None, val_batch, 0)
    mask = val_batch["marker_mask"]
    assert val_batch["image"].data_ptr() == storage
    assert bool(mask.any())
    assert torch.equal(val_batch["image"][~mask], untouched[~mask])
    assert not torch.equal(val_batch["image"], untouched)

    # Evaluation markers are the same every epoch, so sensitivity runs are comparable.
    later = {"image": normalised_batch(5)}
    injector.on_validation_batch_start(SimpleNamespace(current_epoch=3), None, later, 0)
    assert torch.equal(later["marker_mask"], mask)
    test_batch = (normalised_batch(5), torch.zeros(4))
    injector.on_test_batch_start(trainer, None, test_batch, 0)
    assert not torch.equal(test_batch[0], untouched)


def test_callback_draws_fresh_training_markers_each_epoch():
    injector = MarkerInjector(stages=("train",), seed=0)
    masks = []
    for epoch in (0, 1):
        batch = {"image": normalised_batch(6)}
        injector.on_train_batch_start(SimpleNamespace(current_epoch=epoch), None, batch, 0)
        masks.append(batch["marker_mask"])
    assert not torch.equal(masks[0], masks[1])
    with pytest.raises(ValueError, match="stages"):
        MarkerInjector(stages=("predict",))


class RecordingModule(L.LightningModule):
    """Records what training_step and validation_step actually receive."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(("marker_mask" in batch, batch["image"].clone()))
        return self.layer(batch["image"].mean().view(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(("marker_mask" in batch, batch["image"].clone()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_callback_reaches_the_steps_inside_a_real_trainer():
    images = normalised_batch(7, count=4, size=32)
    loader = torch.utils.data.DataLoader([{"image": image[0:1]} for image in images], batch_size=2)
    module = RecordingModule()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        callbacks=[MarkerInjector(stages=("train",), seed=0)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader, loader)
    assert [has_mask for has_mask, _ in module.seen["train"]] == [True, True]
    assert [has_mask for has_mask, _ in module.seen["val"]] == [False, False]
    trained = torch.cat([batch for _, batch in module.seen["train"]])
    validated = torch.cat([batch for _, batch in module.seen["val"]])
    assert not torch.equal(trained, images)
    assert torch.equal(validated, images)
