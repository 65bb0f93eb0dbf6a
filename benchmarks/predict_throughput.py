"""Images/s of ``tus predict`` against a plain loop over the same exported model, and of onnxruntime on its ONNX export.

All three go from image files to class probabilities on the same folder of phantom images (decode, resize,
normalise, forward), one process, the same batch size and torch threads, measured in the same run:

- tus: :func:`tus.stages.predict.run_predict` (the ``tus predict`` code path: model loading, CSV writing included);
- plain loop: PIL + OpenCV decode/resize, numpy normalisation, ``timm`` model built from the export's
  ``config.json`` and ``model.safetensors`` (no tus import in the loop), ``torch.inference_mode``;
- onnxruntime: the ``tus export --format onnx`` graph fed by the same plain preprocessing.

Each is timed ``--repeats`` times, every repeat starting with another of the three, and the best is kept. The model is an untrained export of
``--model-name`` (throughput does not depend on the weights).

    python benchmarks/predict_throughput.py                 # ~2 min on 2 busy CPU cores
    python benchmarks/predict_throughput.py --images 512 --image-size 224 --model-name resnet18
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import timm
import torch
from common import machine_line
from PIL import Image
from safetensors.torch import load_file

from tus.data.images import write_grayscale
from tus.methods.classifier import FineTuneModule, save_finetuned
from tus.models.backbones import BackboneConfig
from tus.stages.export import run_export
from tus.stages.predict import run_predict

TARGET = 0.9


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        image = rng.integers(20, 200, (size, size), dtype=np.uint8)
        paths.append(folder / f"img{i:05d}.png")
        write_grayscale(paths[-1], image)
    return paths


def plain_preprocess(path: Path, size: int, mean: float, std: float) -> np.ndarray:
    grey = np.asarray(Image.open(path).convert("L"))
    if grey.shape != (size, size):
        grey = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA if min(grey.shape) > size else cv2.INTER_LINEAR)
    return ((grey.astype(np.float32) / 255.0 - mean) / std)[None]


class PlainClassifier(torch.nn.Module):
    def __init__(self, folder: Path):
        super().__init__()
        config = json.loads((folder / "config.json").read_text())
        kwargs = {k: v for k, v in config["hparams"]["backbone"].items() if k in ("img_size", "patch_size", "global_pool") and v is not None}
        self.backbone = timm.create_model(config["architecture"]["name"], pretrained=False, num_classes=0, in_chans=config["in_chans"], **kwargs)
        self.head = torch.nn.Linear(self.backbone.num_features, config["num_classes"])
        self.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def plain_loop(folder: Path, paths: list[Path], batch_size: int) -> np.ndarray:
    config = json.loads((folder / "config.json").read_text())
    size, mean, std = config["image_size"], config["normalization"]["mean"][0], config["normalization"]["std"][0]
    model = PlainClassifier(folder)
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = torch.from_numpy(np.stack([plain_preprocess(p, size, mean, std) for p in paths[start : start + batch_size]]))
            out.append(model(batch).softmax(1).numpy())
    return np.concatenate(out)


def onnx_loop(export_dir: Path, paths: list[Path], batch_size: int) -> np.ndarray:
    import onnxruntime

    spec = json.loads((export_dir / "preprocess.json").read_text())
    size = spec["resize"]["height"]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(paths), batch_size):
        batch = np.stack([plain_preprocess(p, size, spec["mean"][0], spec["std"][0]) for p in paths[start : start + batch_size]])
        out.append(session.run(["probabilities"], {"image": batch})[0])
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--source-size", type=int, default=256, help="the image files' size (resized to --image-size)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model-name", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(machine_line(torch.device("cpu")))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_images(root / "images", args.images, args.source_size)
        torch.manual_seed(0)
        folder = save_finetuned(FineTuneModule(BackboneConfig(name=args.model_name, init="scratch"), {}), root / "fold" / "model", image_size=args.image_size)
        export_dir = run_export(folder, "onnx", root / "onnx")
        timings: dict[str, list[float]] = {"tus predict": [], "plain loop": [], "onnxruntime": []}
        results = {}
        runners = {
            "tus predict": lambda repeat: run_predict(folder, root / "images", root / f"preds{repeat}.csv", batch_size=args.batch_size, progress=False),
            "plain loop": lambda repeat: results.__setitem__("plain", plain_loop(folder, paths, args.batch_size)),
            "onnxruntime": lambda repeat: results.__setitem__("onnx", onnx_loop(export_dir, paths, args.batch_size)),
        }
        names = list(runners)
        for repeat in range(args.repeats):
            # Each repeat starts with another contender, so none is always first (cold) or last.
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                start = time.perf_counter()
                runners[name](repeat)
                timings[name].append(time.perf_counter() - start)
        import pandas as pd

        tus_probs = pd.read_csv(root / "preds0.csv")[[c for c in pd.read_csv(root / "preds0.csv").columns if c.startswith("prob_")]].to_numpy()
        print(f"{args.images} images {args.source_size} px -> {args.image_size} px, {args.model_name}, batch {args.batch_size}, best of {args.repeats}")
        speeds = {name: args.images / min(seconds) for name, seconds in timings.items()}
        for name, speed in speeds.items():
            print(f"{name:<12}: {speed:8.1f} images/s")
        print(f"max |tus - plain| probability: {np.abs(tus_probs - results['plain']).max():.2e}; |onnx - plain|: {np.abs(results['onnx'] - results['plain']).max():.2e}")
        print(f"ratio tus predict / plain loop = {speeds['tus predict'] / speeds['plain loop']:.3f} (target >= {TARGET})")
        print(f"ratio onnxruntime / plain loop = {speeds['onnxruntime'] / speeds['plain loop']:.3f}")


if __name__ == "__main__":
    main()
