"""ChannelsLast callback: same outputs as NCHW, batches converted in place, no-op without convs;
'auto' on a CPU keeps the format its first training batch measured faster, stores that choice and
reuses it (store, checkpoint), and the timing trials leave the run as it was."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tus.callbacks import performance
from tus.callbacks.performance import (
    ChannelsLast,
    MemoryFormatChoices,
    batch_images_to_channels_last,
    time_training_step,
)

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


def fake_timer(channels_last_faster: bool):
    """A stand-in for time_training_step: no trial steps, a fixed verdict."""

    def timer(trainer, pl_module, batch, channels_last: bool) -> float:
        return 1.0 if channels_last == channels_last_faster else 2.0

    return timer


def refuse_to_time(*args, **kwargs):
    raise AssertionError("the choice should have been reused, not measured")


# The fits here train one step (run()); every test but the short-fit one measures them as it
# would a fit longer than the trial.
TRIAL_STEPS = performance.TRIAL_STEPS


@pytest.fixture(autouse=True)
def measure_one_step_fits(monkeypatch):
    monkeypatch.setattr(performance, "TRIAL_STEPS", 1)


def test_a_fit_shorter_than_the_trial_trains_nchw_untimed_and_stores_nothing(monkeypatch, tmp_path):
    # The trial: TRIAL_ROUNDS rounds x 2 formats x (warm-up + timed) steps.
    assert TRIAL_STEPS == performance.TRIAL_ROUNDS * 2 * (performance.TRIAL_WARMUP_STEPS + performance.TRIAL_TIMED_STEPS) == 16
    monkeypatch.setattr(performance, "TRIAL_STEPS", TRIAL_STEPS)
    monkeypatch.setattr(performance, "time_training_step", refuse_to_time)
    path = tmp_path / "choices.json"
    callback = ChannelsLast("auto", choices=MemoryFormatChoices(path))
    module, _ = run(conv_net(), [callback])  # max_steps=1
    assert not callback.active and module.layouts == [(False, False, False)] * 4
    assert callback.measured == {"channels_last": False, "nchw_ms": None, "channels_last_ms": None}
    assert not path.exists()  # the machine's first longer fit measures
    # A resumed fit keeps the format the run started in.
    assert callback.state_dict() == {"measured": callback.measured}

    # A choice stored by an earlier, longer fit is used by a short one too.
    monkeypatch.setattr(performance, "TRIAL_STEPS", 1)
    monkeypatch.setattr(performance, "time_training_step", fake_timer(channels_last_faster=True))
    run(conv_net(), [ChannelsLast("auto", choices=MemoryFormatChoices(path))])
    monkeypatch.setattr(performance, "TRIAL_STEPS", TRIAL_STEPS)
    monkeypatch.setattr(performance, "time_training_step", refuse_to_time)
    short = ChannelsLast("auto", choices=MemoryFormatChoices(path))
    module, _ = run(conv_net(), [short])
    assert short.active and module.layouts == [(True, True, True)] * 4


@pytest.mark.parametrize("enabled", [True, "auto"])
def test_conv_model_runs_nhwc_with_nchw_results(enabled, monkeypatch, tmp_path):
    monkeypatch.setattr(performance, "time_training_step", fake_timer(channels_last_faster=True))
    reference, expected = run(conv_net(), [])
    callback = ChannelsLast(enabled, choices=MemoryFormatChoices(tmp_path / "choices.json"))
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


@pytest.mark.parametrize("channels_last_faster", [True, False])
def test_auto_on_cpu_keeps_the_format_measured_faster_and_stores_it(channels_last_faster, monkeypatch, tmp_path):
    monkeypatch.setattr(performance, "time_training_step", fake_timer(channels_last_faster))
    choices = MemoryFormatChoices(tmp_path / "tuning" / "choices.json")
    callback = ChannelsLast("auto", choices=choices)
    module, _ = run(conv_net(), [callback])
    assert callback.active is channels_last_faster
    assert module.layouts == [(channels_last_faster,) * 3] * 4
    assert is_nhwc(module.net[0].weight) is channels_last_faster
    assert callback.measured == {"channels_last": channels_last_faster, "nchw_ms": 1000.0 * (1 + channels_last_faster), "channels_last_ms": 1000.0 * (2 - channels_last_faster)}
    (key, stored), *others = choices._read().items()
    assert not others and stored == callback.measured
    assert "Recorder" in key and "images [(4, 3, 12, 12), (4, 3, 12, 12), (4, 3, 12, 12)]" in key and "precision 32-true" in key

    # A second run on this machine and setting reuses the stored choice without timing.
    monkeypatch.setattr(performance, "time_training_step", refuse_to_time)
    again = ChannelsLast("auto", choices=choices)
    module, _ = run(conv_net(), [again])
    assert again.active is channels_last_faster and module.layouts == [(channels_last_faster,) * 3] * 4


def test_a_resumed_fit_trains_in_the_checkpointed_format(monkeypatch, tmp_path):
    monkeypatch.setattr(performance, "time_training_step", refuse_to_time)
    first = ChannelsLast("auto", choices=MemoryFormatChoices(tmp_path / "a.json"))
    first.measured = {"channels_last": True, "nchw_ms": 2.0, "channels_last_ms": 1.0}
    resumed = ChannelsLast("auto", choices=MemoryFormatChoices(tmp_path / "empty.json"))
    resumed.load_state_dict(first.state_dict())
    module, _ = run(conv_net(), [resumed])
    assert resumed.active and module.layouts == [(True, True, True)] * 4
    assert ChannelsLast("auto").state_dict() == {}  # nothing measured: nothing stored


def test_an_unreadable_store_means_measure_again(monkeypatch, tmp_path):
    path = tmp_path / "choices.json"
    path.write_text("{not json")
    monkeypatch.setattr(performance, "time_training_step", fake_timer(channels_last_faster=False))
    callback = ChannelsLast("auto", choices=MemoryFormatChoices(path))
    run(conv_net(), [callback])
    assert not callback.active and len(MemoryFormatChoices(path)._read()) == 1


class NoisyStep(Recorder):
    """A training step that logs, draws random numbers, updates BatchNorm statistics and a
    history it keeps outside its buffers (as IDDPM's loss-aware timestep sampler does)."""

    def __init__(self, net: nn.Module):
        super().__init__(net)
        self.logged = 0
        self.history: list[float] = [0.5]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = checkpoint["history"]

    def log(self, *args, **kwargs) -> None:
        self.logged += 1

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        noise = torch.randn_like(batch["image"])
        loss = nn.functional.cross_entropy(self(batch["image"] + noise), batch["label"])
        self.log("train/loss", loss)
        self.history.append(float(loss))
        return {"loss": loss}


@pytest.mark.parametrize("channels_last", [False, True])
def test_timing_trials_leave_no_trace(channels_last):
    module = NoisyStep(conv_net()).train()
    batch = {"image": Views().images, "label": torch.tensor([0, 1, 0, 1])}
    buffers = [b.clone() for b in module.buffers()]
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    seconds = time_training_step(trainer, module, batch, channels_last=channels_last)
    assert seconds is not None and 0 < seconds < 10
    assert all(torch.equal(a, b) for a, b in zip(module.buffers(), buffers))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in module.parameters())
    assert module.logged == 0 and "log" not in vars(module)
    assert module.history == [0.5]
    assert batch["image"].is_contiguous()  # the caller's batch is not converted
    assert is_nhwc(module.net[0].weight) is channels_last  # the module is left in the format timed


@pytest.mark.parametrize(("nchw", "channels_last", "chosen"), [(1.0, 0.95, False), (1.0, 0.91, False), (1.0, 0.89, True), (1.0, 1.2, False)])
def test_channels_last_needs_a_margin_to_be_chosen(nchw, channels_last, chosen, monkeypatch, tmp_path):
    """NCHW stays unless channels_last's step is at least 10% faster (a 5% win is timing noise on a loaded machine)."""
    assert performance.TRIAL_MARGIN == 0.10

    def timer(trainer, pl_module, batch, channels_last: bool) -> float:
        return channels_last_seconds if channels_last else nchw

    channels_last_seconds = channels_last
    monkeypatch.setattr(performance, "time_training_step", timer)
    callback = ChannelsLast("auto", choices=MemoryFormatChoices(tmp_path / "choices.json"))
    module, _ = run(conv_net(), [callback])
    assert callback.active is chosen
    assert module.layouts == [(chosen,) * 3] * 4


def test_trials_time_several_steps_after_a_warm_up_in_alternating_rounds(monkeypatch, tmp_path):
    calls: list[bool] = []

    def timer(trainer, pl_module, batch, channels_last: bool) -> float:
        calls.append(channels_last)
        return 1.0

    monkeypatch.setattr(performance, "time_training_step", timer)
    run(conv_net(), [ChannelsLast("auto", choices=MemoryFormatChoices(tmp_path / "choices.json"))])
    assert calls == [False, True] * performance.TRIAL_ROUNDS
    assert performance.TRIAL_WARMUP_STEPS >= 1 and performance.TRIAL_TIMED_STEPS >= 3

    # Inside one trial: the warm-up steps run but are not counted; the fastest timed one is.
    durations = iter([5.0] * performance.TRIAL_WARMUP_STEPS + [0.3, 0.2, 0.4][: performance.TRIAL_TIMED_STEPS])
    clock = {"now": 0.0, "start": True}

    def perf_counter() -> float:
        if not clock["start"]:
            clock["now"] += next(durations)
        clock["start"] = not clock["start"]
        return clock["now"]

    module = Recorder(conv_net()).train()
    batch = {"image": Views().images, "views": [], "label": torch.tensor([0, 1, 0, 1])}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    monkeypatch.setattr(performance.time, "perf_counter", perf_counter)
    assert time_training_step(trainer, module, batch, channels_last=False) == pytest.approx(0.2)


def test_choice_key_names_what_was_measured():
    batch = {"image": torch.zeros(4, 3, 12, 12), "label": torch.zeros(4)}
    key = MemoryFormatChoices.key(Recorder(conv_net()), batch, "32-true")
    assert f"torch {torch.__version__}" in key and f"{torch.get_num_threads()} threads" in key
    assert performance.cpu_model() in key and "precision 32-true" in key and "images [(4, 3, 12, 12)]" in key
    assert "margin 10%" in key  # choices made by an older protocol are measured again
    # Another batch size, image size or precision is another key.
    assert MemoryFormatChoices.key(Recorder(conv_net()), {"image": torch.zeros(8, 3, 12, 12)}, "32-true") != key
    assert MemoryFormatChoices.key(Recorder(conv_net()), {"image": torch.zeros(4, 3, 16, 16), "label": torch.zeros(4)}, "32-true") != key
    assert MemoryFormatChoices.key(Recorder(conv_net()), batch, "bf16-mixed") != key
    # Another model of the same class and the same number of parameters is another key too.
    same_size = conv_net()
    same_size[2] = nn.GELU()
    assert sum(p.numel() for p in same_size.parameters()) == sum(p.numel() for p in conv_net().parameters())
    assert MemoryFormatChoices.key(Recorder(same_size), batch, "32-true") != key


@pytest.mark.parametrize(
    ("device", "world_size", "measures"),
    [("cpu", 1, True), ("cuda", 1, True), ("cuda", 2, False), ("cpu", 2, False), ("mps", 1, False)],
)
def test_auto_times_on_one_cpu_or_gpu_and_never_across_ranks(device, world_size, measures):
    # On an H200 in bf16 the diffusion U-Net ran 0.74x as fast in channels_last (ResNet-18 1.45x),
    # so one GPU measures like one CPU; DDP ranks must share one layout, so they never time apart.
    module = conv_net()
    module.__dict__["device"] = torch.device(device)  # what Lightning reports after moving it
    trainer = type("Trainer", (), {"world_size": world_size})()
    assert ChannelsLast("auto")._measures(trainer, module) is measures
    assert ChannelsLast(True)._measures(trainer, module) is False
