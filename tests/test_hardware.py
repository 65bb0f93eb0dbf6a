"""Precision and memory-format policy (tus.hardware) against hand-written tables."""

from __future__ import annotations

import copy
import itertools
import warnings

import cv2
import pytest
import timm
import torch
from torch import nn

from tus.hardware import (
    HardwareCaps,
    batch_to_channels_last,
    detect_caps,
    is_spatial_conv,
    keep_opencv_on_calling_thread,
    prefers_channels_last,
    resolve_precision,
    to_channels_last,
)


def expected_auto(caps: HardwareCaps, accelerator: str) -> str:
    """The policy written out: native bf16 first, fp16 on pre-Ampere GPUs, else fp32."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and caps.cuda)
    if on_gpu:
        return "bf16-mixed" if caps.cuda_bf16 else "16-mixed"
    return "bf16-mixed" if caps.cpu_native_bf16 else "32-true"


ALL_CAPS = [HardwareCaps(*flags) for flags in itertools.product([False, True], repeat=3)]


@pytest.mark.parametrize("caps", ALL_CAPS, ids=str)
@pytest.mark.parametrize("accelerator", ["auto", "cpu", "gpu", "cuda"])
def test_auto_precision_for_every_capability_table(caps: HardwareCaps, accelerator: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("auto", accelerator, caps) == expected_auto(caps, accelerator)


@pytest.mark.parametrize(
    ("caps", "accelerator", "expected"),
    [
        (HardwareCaps(cuda=True, cuda_bf16=True, cpu_native_bf16=False), "auto", "bf16-mixed"),  # A100/H100
        (HardwareCaps(cuda=True, cuda_bf16=False, cpu_native_bf16=False), "auto", "16-mixed"),  # V100/T4
        (HardwareCaps(cuda=True, cuda_bf16=True, cpu_native_bf16=False), "cpu", "32-true"),  # forced CPU
        (HardwareCaps(cuda=False, cuda_bf16=False, cpu_native_bf16=True), "auto", "bf16-mixed"),  # Sapphire Rapids
        (HardwareCaps(cuda=False, cuda_bf16=False, cpu_native_bf16=False), "auto", "32-true"),  # laptop
    ],
)
def test_auto_precision_named_machines(caps: HardwareCaps, accelerator: str, expected: str) -> None:
    assert resolve_precision("auto", accelerator, caps) == expected


@pytest.mark.parametrize("requested", ["bf16-mixed", "bf16-true", "bf16"])
def test_explicit_bf16_on_emulating_cpu_warns_but_passes_through(requested: str) -> None:
    caps = HardwareCaps(cuda=False, cuda_bf16=False, cpu_native_bf16=False)
    for accelerator in ("cpu", "auto"):
        with pytest.warns(UserWarning, match="emulated") as record:
            assert resolve_precision(requested, accelerator, caps) == requested
        assert len(record) == 1 and "\n" not in str(record[0].message)


@pytest.mark.parametrize(
    ("caps", "accelerator"),
    [
        (HardwareCaps(cuda=False, cuda_bf16=False, cpu_native_bf16=True), "cpu"),  # native CPU bf16
        (HardwareCaps(cuda=True, cuda_bf16=True, cpu_native_bf16=False), "auto"),  # runs on the GPU
        (HardwareCaps(cuda=True, cuda_bf16=True, cpu_native_bf16=False), "gpu"),
    ],
)
def test_explicit_bf16_where_native_is_silent(caps: HardwareCaps, accelerator: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16-mixed", accelerator, caps) == "bf16-mixed"


@pytest.mark.parametrize("requested", ["32-true", "16-mixed", "64-true", "16-true", "transformer-engine"])
def test_explicit_non_bf16_precision_passes_through_silently(requested: str) -> None:
    for caps in ALL_CAPS:
        for accelerator in ("auto", "cpu", "gpu", "cuda"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert resolve_precision(requested, accelerator, caps) == requested


def test_unknown_accelerator_is_rejected() -> None:
    with pytest.raises(ValueError, match="accelerator"):
        resolve_precision("auto", "tpu", ALL_CAPS[0])


def test_detect_caps_agrees_with_torch() -> None:
    caps = detect_caps()
    assert caps.cuda == torch.cuda.is_available()
    assert caps.cuda_bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert caps.cpu_native_bf16 == torch.cpu._is_amx_tile_supported()  # AVX512-BF16 alone is slower than fp32


@pytest.mark.parametrize(
    ("conv", "spatial"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), True),
        (nn.Conv2d(3, 8, 7, stride=2, padding=3), True),  # ResNet stem
        (nn.Conv2d(3, 8, 1), False),  # pointwise
        (nn.Conv2d(3, 8, 16, stride=16), False),  # ViT patch embedding
        (nn.Conv1d(3, 8, 3), False),
    ],
)
def test_spatial_conv_rule(conv: nn.Module, spatial: bool) -> None:
    assert is_spatial_conv(conv) is spatial


def test_channels_last_policy() -> None:
    resnet = timm.create_model("resnet10t", in_chans=1, num_classes=2)
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert prefers_channels_last(resnet, "cuda") and prefers_channels_last(resnet, "cpu")
    assert not prefers_channels_last(resnet, "mps")
    assert not prefers_channels_last(mlp, "cuda")
    # Names are instantiated on the meta device (no weights): a ViT's patch conv does not count.
    assert prefers_channels_last("resnet10t", "cpu")
    assert not prefers_channels_last("vit_tiny_patch16_224", "cuda")


def test_batch_to_channels_last_only_touches_4d() -> None:
    batch = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    converted = batch_to_channels_last(batch)
    assert converted.is_contiguous(memory_format=torch.channels_last)
    assert converted.stride() == (60, 1, 15, 3)  # NHWC strides: C fastest
    assert torch.equal(converted, batch)
    vector = torch.ones(3, 4)
    assert batch_to_channels_last(vector) is vector


def _resnet_pair(dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    reference = timm.create_model("resnet10t", in_chans=1, num_classes=2).eval().to(dtype)
    # timm zero-initialises each block's last BN scale; random BN statistics make every
    # parameter receive a gradient, so every layer's layout is exercised.
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    converted = to_channels_last(copy.deepcopy(reference))
    # The 1-channel stem is both layouts at once; a 3x3 conv of layer1 is not.
    weight = converted.layer1[0].conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return reference, converted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_resnet_forward_matches_nchw(dtype: torch.dtype) -> None:
    reference, converted = _resnet_pair(dtype)
    images = torch.randn(4, 1, 32, 32, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(converted(batch_to_channels_last(images)), reference(images), rtol=1e-4, atol=1e-6)


def test_channels_last_resnet_training_step_matches_nchw() -> None:
    # float64: in float32 the max-pool's argmax among near-equal values can flip with rounding
    # (NCHW float32 itself differs from float64 by ~1% on the stem gradient), which would
    # test rounding luck rather than the memory format.
    reference, converted = _resnet_pair(torch.float64)
    images = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    for model, batch in ((reference, images), (converted, batch_to_channels_last(images))):
        nn.functional.cross_entropy(model(batch), labels).backward()
    for (name, param), param_cl in zip(reference.named_parameters(), converted.parameters(), strict=True):
        assert param.grad is not None and param.grad.abs().max() > 0, name
        torch.testing.assert_close(param_cl.grad, param.grad, rtol=1e-9, atol=1e-12, msg=name)

    # One SGD step from identical weights lands on identical weights, whatever the layout.
    for model in (reference, converted):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    for param, param_cl in zip(reference.parameters(), converted.parameters(), strict=True):
        torch.testing.assert_close(param_cl, param, rtol=1e-9, atol=1e-12)


@pytest.fixture
def opencv_threads():
    """Restore OpenCV's thread count after a test changes it."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(max(2, before))
    yield
    cv2.setNumThreads(before)


def test_opencv_runs_on_the_calling_thread(opencv_threads):
    assert cv2.getNumThreads() >= 2
    keep_opencv_on_calling_thread()
    assert cv2.getNumThreads() == 1


def test_every_stage_trainer_keeps_opencv_off_the_training_cores(opencv_threads, tmp_path):
    from tus.runs import TrainerConfig, build_trainer

    build_trainer(TrainerConfig(accelerator="cpu", max_epochs=1, enable_progress_bar=False), tmp_path, loggers=[])
    assert cv2.getNumThreads() == 1
