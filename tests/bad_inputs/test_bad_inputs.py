"""Hostile but realistic inputs to every data/synthetic/explain/sample command (issue 11).

Each case runs the command in-process through ``tus.cli.main.main`` and asserts that it fails with the
expected exit code (2 for usage/option errors, 1 for data errors), that what it printed is one line
naming the file, row, column or option at fault (no traceback), that no pickle payload ran, and
that every input file is byte-identical afterwards.

Until ``tus.cli.main`` has its top-level handler, :func:`run_tus` stands in for it: an escaping
``UsageError``/``ConfigError``/``FileExistsError`` becomes exit code 2, any other ``ValueError``/``OSError``
exit code 1, printed as ``error: <message>``. Any other exception type escapes and fails the test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tus.cli.main import main
from tus.config import ConfigError
from tus.data.images import UsageError, read_grayscale, write_grayscale
from tus.methods.iddpm import UNetConfig
from tus.models.backbones import BackboneConfig, create_backbone, save_encoder

MARKER = "payload-ran"


class Payload:
    """Unpickling this creates the marker file: proof that a loader executed code from a weights file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path, form: str = "torch-zip") -> Path:
    """A weights-looking file whose loading with a full unpickler creates ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"state_dict": {"conv.weight": Payload(marker)}}
    if form == "torch-zip":
        torch.save(content, path)
    elif form == "torch-legacy":
        torch.save(content, path, _use_new_zipfile_serialization=False)
    elif form == "pickle":
        path.write_bytes(pickle.dumps(content, protocol=4))
    elif form == "pickle-text":
        path.write_bytes(pickle.dumps(content, protocol=0))
    else:
        raise ValueError(form)
    return path


def tiny_unet_config() -> dict:
    return asdict(UNetConfig(sample_size=16, base_channels=32, channel_mults=(1,), attention_resolutions=(), attention_head_dim=32, layers_per_block=1))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Inputs built once: images, a manifest, generated images, an encoder export; copied per case."""
    root = tmp_path_factory.mktemp("template")
    rng = np.random.default_rng(0)
    rows = []
    for index in range(6):
        name = f"images/i{index}.png"
        write_grayscale(root / name, rng.integers(0, 255, size=(40, 48), dtype=np.uint8))
        rows.append({"path": name, "patient_id": f"P{index % 3}", "label": index % 2})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    for index in range(4):
        write_grayscale(root / "generated" / f"g{index}.png", rng.integers(0, 255, size=(40, 48), dtype=np.uint8))
    config = BackboneConfig(name="resnet10t", init="scratch")
    save_encoder(create_backbone(config), config, root / "encoder")
    return root


@dataclass
class Case:
    """A command line (``{in}`` is the input folder, ``{out}`` an output folder), a setup, and expectations."""

    id: str
    argv: list[str]
    setup: Callable[[Path, Path], None] | None
    code: int | None  # None: any non-zero code (commands this module does not own)
    names: tuple[str, ...]  # substrings the one-line message must contain
    env: dict[str, str] | None = None


def hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def run_tus(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)``'s exit code and everything it printed (see the module docstring)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except (UsageError, ConfigError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        code = 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --- setups: each gets (input folder, marker path) --------------------------------------------------


def manifest_text(text: str) -> Callable[[Path, Path], None]:
    def setup(inputs: Path, marker: Path) -> None:
        (inputs / "bad.csv").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)

    return setup


def bad_image(kind: str) -> Callable[[Path, Path], None]:
    """Replace images/i1.png's row with a problematic file, listed on manifest line 3."""

    def setup(inputs: Path, marker: Path) -> None:
        frame = pd.read_csv(inputs / "manifest.csv")
        target = inputs / "images" / ("i1.tif" if kind in ("multipage", "nan") else "i1.png")
        if kind == "multipage":
            pages = [Image.fromarray(np.full((40, 48), v, dtype=np.uint8)) for v in (10, 200)]
            pages[0].save(target, save_all=True, append_images=pages[1:])
        elif kind == "nan":
            array = np.ones((40, 48), dtype=np.float32)
            array[3, 4] = np.nan
            Image.fromarray(array, mode="F").save(target)
        elif kind == "corrupt":
            target.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        elif kind == "bomb":
            write_grayscale(target, np.zeros((400, 400), dtype=np.uint8))
        frame.loc[1, "path"] = f"images/{target.name}"
        frame.to_csv(inputs / "manifest.csv", index=False)

    return setup


def payload_at(relative: str, form: str = "torch-zip", meta: dict | None = None) -> Callable[[Path, Path], None]:
    def setup(inputs: Path, marker: Path) -> None:
        path = write_payload(inputs / relative, marker, form)
        if meta is not None:
            path.with_suffix(".json").write_text(json.dumps(meta))

    return setup


def files(contents: dict[str, bytes | str]) -> Callable[[Path, Path], None]:
    def setup(inputs: Path, marker: Path) -> None:
        for name, content in contents.items():
            path = inputs / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def three_channel_encoder_claiming_one(inputs: Path, marker: Path) -> None:
    config = BackboneConfig(name="resnet10t", init="scratch", in_chans=3)
    path = save_encoder(create_backbone(config), config, inputs / "rgb") / "config.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "in_chans": 1}))


def non_utf8_generated_name(inputs: Path, marker: Path) -> None:
    name = os.fsdecode(b"g\xff.png")
    shutil.copy(inputs / "generated" / "g0.png", inputs / "generated" / name)


def occupied_out(inputs: Path, marker: Path) -> None:
    (inputs.parent / "out").mkdir()
    (inputs.parent / "out" / "keep.txt").write_text("mine")


ENCODER_META = {"backbone": "resnet10t", "in_chans": 1, "num_features": 512}
CLASSIFIER_META = {"backbone": {"name": "resnet10t", "in_chans": 1}, "optim": {"lr_head": 0.001}, "num_classes": 2}
UNET_META = {"unet": tiny_unet_config(), "process": {"num_timesteps": 10}, "step": 1}
SYN = ["--real", "{in}/manifest.csv", "--generated", "{in}/generated", "--no-cache"]

CASES = [
    # tus data check
    Case("check-duplicate-label-column", ["data", "check", "{in}/bad.csv"], manifest_text("path,label,patient_id,label\nimages/i0.png,0,P0,1\n"), 1, ("bad.csv", "'label'")),
    Case("check-duplicate-path-column", ["data", "check", "{in}/bad.csv"], manifest_text("path,path,label,patient_id\nimages/i0.png,images/i1.png,0,P0\n"), 1, ("bad.csv", "'path'")),
    Case("check-empty-csv", ["data", "check", "{in}/bad.csv"], manifest_text(""), 1, ("bad.csv", "empty")),
    Case("check-blank-lines-csv", ["data", "check", "{in}/bad.csv"], manifest_text("\n\n"), 1, ("bad.csv", "header")),
    Case("check-missing-manifest", ["data", "check", "{in}/nope.csv"], None, 1, ("nope.csv",)),
    Case("check-latin1-csv", ["data", "check", "{in}/bad.csv"], manifest_text(b"path,label\n\xe9t\xe9.png,0\n"), 1, ("bad.csv", "UTF-8")),
    Case("check-reserved-column", ["data", "check", "{in}/bad.csv"], manifest_text("path,abs_path,label,patient_id\nimages/i0.png,x,0,P0\n"), 1, ("bad.csv", "abs_path")),
    Case("check-no-path-column", ["data", "check", "{in}/bad.csv"], manifest_text("file,label\nimages/i0.png,0\n"), 1, ("bad.csv", "'path'")),
    Case("check-multipage-tiff", ["data", "check", "{in}/manifest.csv"], bad_image("multipage"), 1, ("line 3", "i1.tif", "multi-page")),
    Case("check-nan-float-tiff", ["data", "check", "{in}/manifest.csv"], bad_image("nan"), 1, ("line 3", "i1.tif", "NaN")),
    Case("check-corrupt-png", ["data", "check", "{in}/manifest.csv"], bad_image("corrupt"), 1, ("line 3", "i1.png")),
    Case("check-decompression-bomb", ["data", "check", "{in}/manifest.csv"], bad_image("bomb"), 1, ("line 3", "i1.png", "limit")),
    # tus data crop
    Case("crop-box-three-numbers", ["data", "crop", "{in}/manifest.csv", "--out", "{out}", "--box", "1,2,3"], None, 2, ("--box", "1,2,3")),
    Case("crop-box-inverted", ["data", "crop", "{in}/manifest.csv", "--out", "{out}", "--box", "9,9,1,1"], None, 2, ("--box", "9,9,1,1")),
    Case("crop-box-outside-image", ["data", "crop", "{in}/manifest.csv", "--out", "{out}", "--box", "0,0,99,9"], None, 1, ("manifest.csv line 2", "does not fit")),
    Case("crop-duplicate-column", ["data", "crop", "{in}/bad.csv", "--out", "{out}"], manifest_text("path,label,label\nimages/i0.png,0,1\n"), 1, ("bad.csv", "'label'")),
    Case("crop-empty-csv", ["data", "crop", "{in}/bad.csv", "--out", "{out}"], manifest_text(""), 1, ("bad.csv", "empty")),
    Case("crop-out-occupied", ["data", "crop", "{in}/manifest.csv", "--out", "{out}"], occupied_out, 2, ("out",)),
    Case("crop-out-under-proc", ["data", "crop", "{in}/manifest.csv", "--out", "/proc/tus-crops"], None, 1, ("--out", "/proc/tus-crops", "cannot write")),
    Case("crop-multipage-tiff", ["data", "crop", "{in}/manifest.csv", "--out", "{out}"], bad_image("multipage"), 1, ("line 3", "i1.tif", "multi-page")),
    Case("crop-corrupt-image", ["data", "crop", "{in}/manifest.csv", "--out", "{out}"], bad_image("corrupt"), 1, ("line 3", "i1.png")),
    # tus data phantom (tus.data.phantom validates; any non-zero code)
    Case("phantom-label-noise-above-one", ["data", "phantom", "--out", "{out}", "--label-noise", "2"], None, None, ("label_noise",)),
    Case("phantom-out-is-a-dataset", ["data", "phantom", "--out", "{in}", "--patients", "2", "--pool-size", "0"], None, 2, ("--out", "not empty")),
    Case("phantom-out-is-a-file", ["data", "phantom", "--out", "{in}/manifest.csv", "--patients", "2"], None, 2, ("--out", "manifest.csv", "not a folder")),
    Case("phantom-out-under-proc", ["data", "phantom", "--out", "/proc/tus-phantom", "--patients", "2"], None, 1, ("--out", "/proc/tus-phantom", "cannot write")),
    # tus metrics
    Case("metrics-weights-pickle-payload", ["metrics", *SYN, "--weights", "{in}/incep.pt"], payload_at("incep.pt"), 1, ("incep.pt", "refused")),
    Case("metrics-weights-raw-pickle", ["metrics", *SYN, "--weights", "{in}/incep.pkl"], payload_at("incep.pkl", "pickle"), 1, ("incep.pkl", "refused")),
    Case("metrics-env-weights-payload", ["metrics", *SYN], payload_at("incep.pth", "torch-legacy"), 1, ("incep.pth", "refused"), env={"TUS_INCEPTION_WEIGHTS": "{in}/incep.pth"}),
    Case("metrics-weights-text-file", ["metrics", *SYN, "--weights", "{in}/notes.txt"], files({"notes.txt": "these are my notes\n"}), 1, ("notes.txt", "text file")),
    Case("metrics-weights-json-file", ["metrics", *SYN, "--weights", "{in}/encoder/config.json"], None, 1, ("encoder/config.json", "JSON")),
    Case("metrics-weights-empty-file", ["metrics", *SYN, "--weights", "{in}/empty.pt"], files({"empty.pt": b""}), 1, ("empty.pt", "empty")),
    Case("metrics-weights-missing", ["metrics", *SYN, "--weights", "{in}/missing.pt"], None, 1, ("missing.pt",)),
    Case("metrics-weights-wrong-network", ["metrics", *SYN, "--weights", "{in}/encoder/model.safetensors"], None, 1, ("encoder/model.safetensors", "Inception")),
    Case("metrics-encoder-payload", ["metrics", *SYN, "--extractor", "{in}/enc.safetensors"], payload_at("enc.safetensors", meta=ENCODER_META), 1, ("enc.safetensors", "refused")),
    Case("metrics-encoder-without-json", ["metrics", *SYN, "--extractor", "{in}/lone.safetensors"], files({"lone.safetensors": b"x"}), 1, ("lone.safetensors", "lone.json")),
    Case("metrics-encoder-missing", ["metrics", *SYN, "--extractor", "{in}/missing.safetensors"], None, 1, ("missing.safetensors", "not found")),
    Case(
        "metrics-extractor-is-diffusion-export",
        ["metrics", *SYN, "--extractor", "{in}/unet.safetensors"],
        payload_at("unet.safetensors", meta=UNET_META),
        1,
        ("unet.safetensors", "diffusion U-Net export"),
    ),
    Case("metrics-encoder-json-claims-one-channel", ["metrics", *SYN, "--extractor", "{in}/rgb"], three_channel_encoder_claiming_one, 1, ("rgb", "in_chans=1", "3 channel")),
    Case("metrics-real-missing", ["metrics", "--real", "{in}/none", "--generated", "{in}/generated"], None, 1, ("none",)),
    Case("metrics-generated-empty", ["metrics", "--real", "{in}/manifest.csv", "--generated", "{in}/empty_dir"], files({"empty_dir/note.txt": "not an image"}), 1, ("empty_dir", "no images")),
    Case("metrics-real-duplicate-column", ["metrics", "--real", "{in}/bad.csv", "--generated", "{in}/generated"], manifest_text("path,path\nimages/i0.png,images/i1.png\n"), 1, ("bad.csv", "'path'")),
    Case("metrics-batch-size-zero", ["metrics", *SYN, "--batch-size", "0"], None, 2, ("--batch-size",)),
    Case("metrics-out-is-a-folder", ["metrics", *SYN, "--out", "{in}/images"], None, 2, ("--out",)),
    Case("metrics-out-dev-full", ["metrics", *SYN, "--out", "/dev/full"], None, 2, ("--out", "/dev/full", "not a regular file")),
    Case("metrics-out-under-proc", ["metrics", *SYN, "--out", "/proc/tus-metrics.json"], None, 1, ("--out", "/proc/tus-metrics.json", "cannot write")),
    Case("metrics-image-size-one", ["metrics", *SYN, "--extractor", "{in}/encoder", "--image-size", "1"], None, 2, ("--image-size 1", "minimum input size, 32 px")),
    Case("metrics-image-size-with-inception", ["metrics", *SYN, "--image-size", "64"], None, 2, ("--image-size", "Inception")),
    # tus filter
    Case("filter-weights-payload", ["filter", *SYN, "--out", "{out}", "--k", "2", "--weights", "{in}/incep.pt"], payload_at("incep.pt"), 1, ("incep.pt", "refused")),
    Case("filter-env-weights-payload", ["filter", *SYN, "--out", "{out}", "--k", "2"], payload_at("incep.pt", "pickle-text"), 1, ("incep.pt",), env={"TUS_INCEPTION_WEIGHTS": "{in}/incep.pt"}),
    Case("filter-out-occupied", ["filter", *SYN, "--out", "{out}", "--k", "2", "--weights", "{in}/missing.pt"], occupied_out, 2, ("out", "not empty")),
    Case("filter-out-inside-generated", ["filter", *SYN, "--out", "{in}/generated/kept", "--k", "2"], None, 2, ("generated",)),
    Case("filter-empty-sweep", ["filter", *SYN, "--out", "{out}", "--k", "2", "--sweep", ","], None, 2, ("--sweep",)),
    Case("filter-sweep-k-too-large", ["filter", *SYN, "--out", "{out}", "--k", "2", "--sweep", "2,50"], None, 2, ("--sweep", "50")),
    Case("filter-k-zero", ["filter", *SYN, "--out", "{out}", "--k", "0"], None, 2, ("k must be",)),
    Case("filter-out-under-proc", ["filter", *SYN, "--out", "/proc/tus-filtered", "--k", "2"], None, 1, ("--out", "/proc/tus-filtered", "cannot write")),
    Case("filter-out-is-a-file", ["filter", *SYN, "--out", "{in}/manifest.csv", "--k", "2"], None, 2, ("--out", "manifest.csv")),
    Case("filter-non-utf8-file-name", ["filter", *SYN, "--out", "{out}", "--k", "2"], non_utf8_generated_name, 1, ("g\\xff.png", "UTF-8")),
    Case("filter-generated-missing", ["filter", "--real", "{in}/manifest.csv", "--generated", "{in}/nothing", "--out", "{out}"], None, 1, ("nothing",)),
    # tus explain
    Case(
        "explain-encoder-export",
        ["explain", "--checkpoint", "{in}/encoder/model.safetensors", "--images", "{in}/images", "--out", "{out}", "--image-size", "32"],
        None,
        1,
        ("encoder/model.safetensors", "encoder export", "not a fine-tuned classifier"),
    ),
    Case(
        "explain-ckpt-payload",
        ["explain", "--checkpoint", "{in}/model.ckpt", "--images", "{in}/images", "--out", "{out}", "--image-size", "32"],
        payload_at("model.ckpt"),
        1,
        ("model.ckpt", "refused"),
    ),
    Case(
        "explain-export-payload",
        ["explain", "--checkpoint", "{in}/model.safetensors", "--images", "{in}/images", "--out", "{out}", "--image-size", "32"],
        payload_at("model.safetensors", "pickle", meta=CLASSIFIER_META),
        1,
        ("model.safetensors", "refused"),
    ),
    Case(
        "explain-diffusion-export",
        ["explain", "--checkpoint", "{in}/unet.json", "--images", "{in}/images", "--out", "{out}", "--image-size", "32"],
        payload_at("unet.safetensors", meta=UNET_META),
        1,
        ("unet.safetensors", "diffusion U-Net export"),
    ),
    Case("explain-checkpoint-missing", ["explain", "--checkpoint", "{in}/gone.ckpt", "--images", "{in}/images", "--out", "{out}"], None, 1, ("--checkpoint", "gone.ckpt")),
    Case(
        "explain-text-ckpt",
        ["explain", "--checkpoint", "{in}/model.ckpt", "--images", "{in}/images", "--out", "{out}", "--image-size", "32"],
        files({"model.ckpt": "epoch: 3\n"}),
        1,
        ("model.ckpt", "text file"),
    ),
    Case("explain-out-occupied", ["explain", "--checkpoint", "{in}/encoder", "--images", "{in}/images", "--out", "{out}"], occupied_out, 2, ("--out",)),
    Case("explain-image-size-zero", ["explain", "--checkpoint", "{in}/encoder", "--images", "{in}/images", "--out", "{out}", "--image-size", "0"], None, 2, ("--image-size",)),
    # tus sample
    Case("sample-export-payload", ["sample", "--checkpoint", "{in}/ema.safetensors", "--n", "1", "--out", "{out}"], payload_at("ema.safetensors", meta=UNET_META), 1, ("ema.safetensors", "refused")),
    Case("sample-ckpt-payload", ["sample", "--checkpoint", "{in}/last.ckpt", "--n", "1", "--out", "{out}"], payload_at("last.ckpt", "torch-legacy"), 1, ("last.ckpt", "refused")),
    Case("sample-encoder-export", ["sample", "--checkpoint", "{in}/encoder", "--n", "1", "--out", "{out}"], None, 1, ("encoder", "encoder export")),
    Case("sample-checkpoint-missing", ["sample", "--checkpoint", "{in}/gone.safetensors", "--n", "1", "--out", "{out}"], None, 1, ("gone.safetensors", "not found")),
    Case("sample-checkpoint-wrong-suffix", ["sample", "--checkpoint", "{in}/manifest.csv", "--n", "1", "--out", "{out}"], None, 1, ("manifest.csv", "--checkpoint")),
    Case("sample-empty-run-dir", ["sample", "--checkpoint", "{in}/images", "--n", "1", "--out", "{out}"], None, 1, ("images", "last.ckpt")),
    Case("sample-n-zero", ["sample", "--checkpoint", "{in}/ema.safetensors", "--n", "0", "--out", "{out}"], None, 2, ("--n",)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_in_one_line_and_leaves_inputs_untouched(case: Case, template, tmp_path, capsys, monkeypatch):
    inputs, out, marker = tmp_path / "in", tmp_path / "out", tmp_path / MARKER
    shutil.copytree(template, inputs)
    if case.setup is not None:
        case.setup(inputs, marker)
    if case.id.endswith("decompression-bomb"):
        # 400 x 400 images are over twice this limit, where PIL raises instead of warning.
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 400 // 3)
    monkeypatch.delenv("TUS_INCEPTION_WEIGHTS", raising=False)
    for name, value in (case.env or {}).items():
        monkeypatch.setenv(name, value.format(**{"in": inputs}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = hash_tree(inputs)

    argv = [arg.format(**{"in": inputs, "out": out}) for arg in case.argv]
    code, printed = run_tus(argv, capsys)

    lines = [line for line in printed.splitlines() if line.strip()]
    assert "Traceback" not in printed
    if case.argv[:2] == ["data", "check"] and len(lines) == 2:
        # data check lists every problem, then a "<manifest>: N problem(s)" total.
        assert lines[1].endswith("1 problem(s)"), printed
        lines = lines[:1]
    assert len(lines) == 1, printed
    if case.code is None:
        assert code != 0
    else:
        assert code == case.code, printed
    for name in case.names:
        assert name in lines[0], (name, lines[0])
    assert "weights_only=False" not in printed
    assert not marker.exists(), "a pickle payload ran"
    assert hash_tree(inputs) == before
    if case.id.startswith(("filter", "explain", "sample", "crop")) and not case.id.endswith("occupied"):
        assert not out.exists() or not any(out.iterdir()), "a failed command left output behind"


def test_the_table_covers_every_command_with_enough_cases():
    commands = {case.argv[1] if case.argv[0] == "data" else case.argv[0] for case in CASES}
    assert commands == {"check", "crop", "phantom", "metrics", "filter", "explain", "sample"}
    assert len(CASES) >= 60


# --- payloads against every weights loader, whatever the command ---------------------------------------

PAYLOAD_FORMS = ("torch-zip", "torch-legacy", "pickle", "pickle-text")


def _create_backbone(init: str, name: str = "resnet10t") -> Callable[[Path], object]:
    def load(path: Path) -> object:
        if init == "tus":
            path.with_suffix(".json").write_text(json.dumps({"backbone": name, "in_chans": 1}))
        return create_backbone(BackboneConfig(name=name, init=init, weights=str(path)))

    return load


def _vit(path: Path) -> object:
    from tus.models.vit import create_vit_encoder, load_vit_weights

    return load_vit_weights(create_vit_encoder("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=1), path)


def _inception(path: Path) -> object:
    from tus.eval.features import InceptionExtractor

    return InceptionExtractor(path)


def _diffusion_export(path: Path) -> object:
    from tus.methods.iddpm import load_unet_export

    path.with_suffix(".json").write_text(json.dumps(UNET_META))
    return load_unet_export(path)


def _diffusion_checkpoint(path: Path) -> object:
    from tus.methods.iddpm import load_ema_from_checkpoint

    return load_ema_from_checkpoint(path)


LOADERS = {
    "finetune-init-uscl": _create_backbone("uscl", "resnet18"),
    "finetune-init-timm": _create_backbone("timm"),
    "finetune-init-tus": _create_backbone("tus"),
    "vit-weights": _vit,
    "inception-weights": _inception,
    "diffusion-export": _diffusion_export,
    "diffusion-checkpoint": _diffusion_checkpoint,
}


@pytest.mark.parametrize("form", PAYLOAD_FORMS)
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_no_weights_loader_runs_a_pickle_payload(loader: str, form: str, tmp_path):
    marker = tmp_path / MARKER
    suffix = ".safetensors" if loader in ("finetune-init-tus", "diffusion-export") else ".pt"
    path = write_payload(tmp_path / f"weights{suffix}", marker, form)
    with pytest.raises(ValueError) as error:
        LOADERS[loader](path)
    message = str(error.value)
    assert not marker.exists(), "a pickle payload ran"
    assert "\n" not in message and path.name in message
    assert "refused" in message or "text-protocol Python pickle" in message
    assert "weights_only=False" not in message


def test_the_payload_would_run_if_unpickled(tmp_path):
    """The planted payload is live: a full unpickler creates the marker (so its absence above means something)."""
    marker = tmp_path / MARKER
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# --- images that used to be read silently wrong ----------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 30), dtype=np.uint8)
    array[0, :] = 255  # a bright top row
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    read = read_grayscale(tmp_path / "rotated.jpg")
    assert read.shape == (30, 20)
    # The stored top row is displayed as the right-hand column.
    assert read[:, -1].mean() > 200 and read[:, 0].mean() < 50


def test_float_tiff_with_infinity_is_refused_and_a_finite_one_is_rescaled(tmp_path):
    array = np.linspace(-1, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    Image.fromarray(array, mode="F").save(tmp_path / "ok.tif")
    read = read_grayscale(tmp_path / "ok.tif")
    assert read.min() == 0 and read.max() == 255
    array[0, 0] = np.inf
    Image.fromarray(array, mode="F").save(tmp_path / "inf.tif")
    with pytest.raises(ValueError, match=r"inf\.tif: floating-point image with 1 NaN/infinite"):
        read_grayscale(tmp_path / "inf.tif")


def test_a_torchscript_module_and_safetensors_load_and_a_folder_is_refused(tmp_path):
    from tus.models.weights import load_weights

    scripted = torch.jit.script(torch.nn.Linear(2, 3))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    (tmp_path / "m.pt").write_bytes(buffer.getvalue())
    loaded = load_weights(tmp_path / "m.pt")
    assert isinstance(loaded, torch.jit.ScriptModule)
    assert torch.equal(loaded.weight, scripted.weight)
    save_file({"w": torch.arange(4.0)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["w"], torch.arange(4.0))
    torch.save({"w": torch.ones(2)}, tmp_path / "s.pt")
    assert torch.equal(load_weights(tmp_path / "s.pt")["w"], torch.ones(2))
    with pytest.raises(ValueError, match="is a folder"):
        load_weights(tmp_path)
