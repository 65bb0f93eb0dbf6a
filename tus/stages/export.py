"""``tus export``: a classifier (fold model, refit model or fold ensemble) as ONNX or TorchScript, with a model card.

The exported graph maps a float32 ``(batch, channels, size, size)`` tensor, made as ``preprocess.json`` says, to
``(batch, classes)`` probabilities: ``softmax(logits / T)`` of each model (``T``: its recorded temperature, 1
without calibration), averaged over the ensemble's models; the batch size is dynamic. The new folder ``--out``:

    model.onnx | model.pt   the graph (input ``image``, output ``probabilities``)
    preprocess.json         how to make the input from an image file, in any language
    MODEL_CARD.md           the model card (:mod:`tus.stages.model_card`); config.json holds the same as data
    config.json             format, file names, classes, threshold, preprocess and the card

It is built in a hidden sibling folder under a lock and renamed into place only when complete.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from torch import nn

import tus
from tus.data.images import OutputExistsError, UsageError
from tus.data.outputs import staged_folder
from tus.stages.model_card import build_model_card, render_model_card
from tus.stages.predict import Predictor, load_predictor

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"


class PlainClassifier(nn.Module):
    """A fine-tuned classifier's backbone and head without Lightning (which the tracers cannot walk)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(image))


class ProbabilityGraph(nn.Module):
    """Mean over models of ``softmax(model(x) / T)``: one graph for a single model or a fold ensemble."""

    def __init__(self, models: Sequence[nn.Module], temperatures: list[float]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(())
        temperatures = self.get_buffer("temperatures")
        for index, model in enumerate(self.models):
            total = total + (model(image) / temperatures[index]).softmax(dim=1)
        return total / len(self.models)


def probability_graph(predictor: Predictor) -> ProbabilityGraph:
    models = [PlainClassifier(m.module.backbone, m.module.head) for m in predictor.members]
    return ProbabilityGraph(models, [m.temperature for m in predictor.members]).eval()


def preprocess_spec(predictor: Predictor) -> dict:
    """What any implementation must do to an image file to feed the graph (mirrors :func:`tus.data.cache.decode_resized`
    and :func:`tus.data.transforms.eval_transform`)."""
    size = predictor.image_size
    spec_input = predictor.input or {}
    before = []
    if spec_input.get("dicom_frames") not in (None, "middle"):
        before.append(f"a multi-frame DICOM: take frame(s) {spec_input['dicom_frames']} (data.dicom_frames; training's choice)")
    if spec_input.get("crop"):
        before.append("cut the image into its ultrasound views as 'crop' says (tus data crop's recipe the training set was made with); each view is one input")
    spec = {
        "steps": [
            *before,
            "decode the file; apply its EXIF orientation",
            "convert to one grey channel: 8-bit RGB by ITU-R 601 luma (L = R*299/1000 + G*587/1000 + B*114/1000, as PIL's convert('L')); 16-bit or float images rescaled linearly from their own min..max to 0..255",
            f"resize to {size} x {size} (aspect ratio not kept): area averaging when shrinking (OpenCV INTER_AREA; for an integer factor f, "
            "the mean of each f x f block rounded half up to uint8), bilinear when enlarging (OpenCV INTER_LINEAR)",
            "to float32: x = (pixel / 255 - mean[c]) / std[c]",
            f"repeat the grey channel to {predictor.in_chans} channel(s); stack images into a batch",
        ],
        "color": "grey",
        "resize": {"height": size, "width": size, "shrink": "area", "enlarge": "bilinear", "keep_aspect_ratio": False},
        "scale": 1 / 255,
        "mean": predictor.normalization["mean"],
        "std": predictor.normalization["std"],
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "shape": ["batch", predictor.in_chans, size, size]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", predictor.num_classes], "meaning": "class probabilities (softmax, averaged over the models)", "label_names": predictor.label_names},
        "decision": {
            "positive_class": predictor.label_names[-1],
            "threshold": predictor.threshold,
            "rule": f"predict {predictor.label_names[-1]} when its probability >= threshold" if predictor.num_classes == 2 else "argmax",
        },
    }
    if spec_input.get("crop"):
        spec["crop"] = spec_input["crop"]
    return spec


def write_graph(graph: nn.Module, fmt: str, path: Path, in_chans: int, size: int) -> None:
    example = torch.zeros(2, in_chans, size, size)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
        if fmt == "onnx":
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        else:
            traced = torch.jit.trace(graph, example, check_trace=False)
            traced.save(str(path))


def run_export(model: str | Path, fmt: str, out: str | Path, *, seed: int | None = None, refit: bool = False) -> Path:
    """Export MODEL (a CV run dir = its fold ensemble, or one model folder) as ``fmt`` into the new folder ``out``."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"--out {out}: exists and is not an empty folder; exports go to a new folder")
    predictor = load_predictor(model, seed=seed, refit=refit)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out.parent / f".{out.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputExistsError(f"--out {out}: another tus export is writing it") from None
    try:
        with staged_folder(out) as staging:
            write_graph(probability_graph(predictor), fmt, staging / FORMATS[fmt], predictor.in_chans, predictor.image_size)
            preprocess = preprocess_spec(predictor)
            card = build_model_card(predictor, fmt)
            config = {
                "tus_version": tus.__version__,
                "kind": "classifier-graph",
                "format": fmt,
                "file": FORMATS[fmt],
                "source": str(Path(model).resolve()),
                "label_names": predictor.label_names,
                "threshold": predictor.threshold,
                "preprocess": preprocess,
                "model_card": card,
            }
            (staging / "preprocess.json").write_text(json.dumps(preprocess, indent=2))
            (staging / "config.json").write_text(json.dumps(config, indent=2))
            (staging / "MODEL_CARD.md").write_text(render_model_card(card))
            staging.chmod(0o755)  # mkdtemp's folder is private; the export is not
    finally:
        lock.release()
        Path(lock.lock_file).unlink(missing_ok=True)
    return out
