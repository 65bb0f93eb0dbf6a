"""Improved-DDPM training: a diffusers U-Net with learned variance, the hybrid loss and an EMA.

The U-Net (:class:`UNetConfig`) mirrors the reference's improved-diffusion model: residual
blocks with scale-shift timestep conditioning, self-attention at chosen resolutions and in
the middle block, strided-conv downsampling, nearest+conv upsampling, and 2C output channels
(noise and the variance interpolation v). The maths lives in
:mod:`tus.losses.gaussian_diffusion`; this module owns the weights, the optimiser and the
exponential moving average of the weights (timm's ``ModelEmaV3``), which is what sampling uses.

Every random draw of a training step (flips, timesteps, noise) comes from a generator seeded
by (seed, epoch, batch index, rank), so a run resumed from a checkpoint repeats exactly the
draws an uninterrupted run would have made.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from diffusers import UNet2DModel
from safetensors import SafetensorError
from timm.utils import ModelEmaV3

from tus.config import from_dict
from tus.data.seeding import derive_seed
from tus.losses.gaussian_diffusion import NoiseSchedule, hybrid_loss, q_sample, timestep_sampler
from tus.models.export import read_export_config, save_export, unet_normalization
from tus.models.weights import CheckpointError, load_weights
from tus.optim import adamw


class DiffusionCheckpointError(ValueError):
    """A diffusion checkpoint or export is missing or does not fit; the message names the file."""


@dataclass
class UNetConfig:
    """The denoising U-Net; the defaults are the reference's 256 px model."""

    sample_size: int = 256
    in_channels: int = 1
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    layers_per_block: int = 2
    # Feature-map sizes (pixels) whose levels get self-attention.
    attention_resolutions: tuple[int, ...] = (16, 8)
    # 512 channels / 128 = 4 heads, improved-diffusion's default num_heads.
    attention_head_dim: int = 128
    dropout: float = 0.0
    norm_num_groups: int = 32
    # Class-conditional U-Net: K labels get an embedding each plus one more, the last, for
    # "no label" (the unconditional branch of classifier-free guidance). None: unconditional.
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"unet.num_classes must be >= 1 (or null for an unconditional U-Net), got {self.num_classes}")

    def level_resolutions(self) -> list[int]:
        return [self.sample_size // 2**level for level in range(len(self.channel_mults))]

    def diffusers_config(self) -> dict:
        """Keyword arguments of ``diffusers.UNet2DModel`` for this config (validated)."""
        resolutions = self.level_resolutions()
        if self.sample_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(f"unet.sample_size {self.sample_size} is not divisible by 2^{len(self.channel_mults) - 1} (one halving per level)")
        unknown = sorted(set(self.attention_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(f"unet.attention_resolutions {unknown} match no level; the levels run at {resolutions} px")
        widths = tuple(self.base_channels * mult for mult in self.channel_mults)
        if any(width % self.norm_num_groups for width in widths):
            raise ValueError(f"unet channel widths {widths} must be divisible by unet.norm_num_groups={self.norm_num_groups}")
        attended = [w for w, r in zip(widths, resolutions) if r in self.attention_resolutions] + [widths[-1]]
        if any(width % self.attention_head_dim for width in attended):
            raise ValueError(f"attention widths {attended} must be divisible by unet.attention_head_dim={self.attention_head_dim}")
        with_attention = [r in self.attention_resolutions for r in resolutions]
        return dict(
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            out_channels=2 * self.in_channels,
            block_out_channels=widths,
            layers_per_block=self.layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in with_attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)),
            mid_block_type="UNetMidBlock2D",
            resnet_time_scale_shift="scale_shift",
            dropout=self.dropout,
            attention_head_dim=self.attention_head_dim,
            norm_num_groups=self.norm_num_groups,
            # With scale-shift the middle attention would otherwise lose its GroupNorm.
            attn_norm_num_groups=self.norm_num_groups,
            downsample_type="conv",
            upsample_type="conv",
            flip_sin_to_cos=True,
            freq_shift=0,
            **({"num_class_embeds": self.num_classes + 1} if self.num_classes is not None else {}),
        )


def build_unet(config: UNetConfig) -> UNet2DModel:
    unet = UNet2DModel(**config.diffusers_config())
    if unet.class_embedding is not None:
        # Zero class embeddings: the new model answers every label as it answers "no label", and a
        # label's embedding moves only when that label is trained on (with p_uncond = 1 none does).
        torch.nn.init.zeros_(unet.class_embedding.weight)
    return unet


def null_label(unet: UNet2DModel) -> int | None:
    """The "no label" class index of a conditional U-Net (its last class embedding); None if unconditional."""
    rows = getattr(unet.config, "num_class_embeds", None)
    return None if rows is None else int(rows) - 1


def training_labels(labels: torch.Tensor, num_classes: int, p_uncond: float, generator: torch.Generator) -> torch.Tensor:
    """Class indices for a conditional training step: each label replaced by the null index ``num_classes`` with
    probability ``p_uncond`` (classifier-free guidance's label dropout), and unlabelled images (-1) always null."""
    labels = labels.to(torch.long)
    bad = (labels < -1) | (labels >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"label {int(labels[bad][0])} is outside 0..{num_classes - 1} (unet.num_classes={num_classes}); -1 marks an unlabelled image")
    dropped = torch.rand(labels.shape[0], generator=generator, device=labels.device) < p_uncond
    return torch.where(dropped | (labels < 0), torch.full_like(labels, num_classes), labels)


@dataclass
class ProcessConfig:
    """The diffusion process and its training objective."""

    num_timesteps: int = 1000
    # lambda of L_hybrid = L_simple + lambda L_vlb (paper Sec. 3.1).
    vlb_weight: float = 0.001
    timestep_sampler: Literal["uniform", "loss_aware"] = "uniform"
    # Probability that a conditional U-Net's training label is replaced by "no label", so one model
    # learns both eps(x, y) and eps(x) for classifier-free guidance (Ho & Salimans use 0.1-0.2).
    # None: 0.1 for a conditional U-Net; an unconditional one takes no labels at all.
    p_uncond: float | None = None

    def __post_init__(self) -> None:
        if self.p_uncond is not None and not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"process.p_uncond must be in [0, 1], got {self.p_uncond}")

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.cosine(self.num_timesteps)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class EmaConfig:
    decay: float = 0.9999
    # Ramp the decay up from 0 (1 - (1 + step)^-2/3) so short runs get a useful average.
    warmup: bool = False


DEFAULT_P_UNCOND = 0.1


class Float32Ema(ModelEmaV3):
    """timm's EMA of a float32 model, picklable for Lightning's ``ddp_spawn``.

    Its bf16 stochastic rounding is off (the average stays float32, as the weights do under
    bf16-mixed), so the generator timm keeps for it is never used; a ``torch.Generator``
    cannot cross torch.multiprocessing's spawn pickling, so it is left out of the pickle.
    """

    def __init__(self, model: torch.nn.Module, decay: float, use_warmup: bool):
        # timm 1.0 releases before stochastic rounding have no such option (and round nothing);
        # the H200 image's timm was one of them, so ask for "off" only where it can be asked.
        off = {"stochastic_rounding": False} if "stochastic_rounding" in inspect.signature(ModelEmaV3.__init__).parameters else {}
        super().__init__(model, decay=decay, use_warmup=use_warmup, **off)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sr_generator": None}


class DiffusionModule(L.LightningModule):
    """Trains ``unet`` with the hybrid loss on batches of images in [-1, 1]; ``ema.module`` samples."""

    def __init__(
        self,
        unet: UNetConfig,
        process: ProcessConfig,
        optim: OptimConfig,
        ema: EmaConfig,
        seed: int = 0,
        hflip: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(
            {
                "unet": asdict(unet),
                "process": asdict(process),
                "optim": asdict(optim),
                "ema": asdict(ema),
                "seed": seed,
                "hflip": hflip,
            }
        )
        if unet.num_classes is None and process.p_uncond is not None:
            raise ValueError("process.p_uncond is the label dropout of a conditional U-Net; set unet.num_classes too (or drop p_uncond)")
        self.process = process
        self.num_classes = unet.num_classes
        self.p_uncond = DEFAULT_P_UNCOND if process.p_uncond is None else process.p_uncond
        self.optim = optim
        self.seed = seed
        self.hflip = hflip
        self.unet = build_unet(unet)
        self.schedule = process.schedule()
        self.timestep_sampler = timestep_sampler(process.timestep_sampler, process.num_timesteps)
        self.ema = Float32Ema(self.unet, decay=ema.decay, use_warmup=ema.warmup)
        # The average is written by update(), never by the optimiser (and DDP must skip it).
        self.ema.requires_grad_(False)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        seed = derive_seed(self.seed, self.current_epoch, batch_idx, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = batch["image"]
        generator = self.step_generator(batch_idx)
        if self.hflip:
            flip = torch.rand(x0.shape[0], generator=generator, device=x0.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t, weights = self.timestep_sampler.sample(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        xt = q_sample(self.schedule, x0, t, noise)
        # Drawn after the noise: an unconditional model's draws are the same as before conditioning existed.
        class_labels = None if self.num_classes is None else training_labels(batch["label"], self.num_classes, self.p_uncond, generator)
        output = self.unet(xt, t, class_labels=class_labels).sample.float()
        terms = hybrid_loss(self.schedule, output, x0, xt, t, noise, self.process.vlb_weight)
        loss = (terms.loss * weights).mean()
        if self.process.timestep_sampler == "loss_aware":
            self.timestep_sampler.update(self.all_gather(t).flatten(), self.all_gather(terms.vlb.detach()).flatten())
        self.log_dict(
            {"train/loss": loss, "train/mse": terms.mse.mean(), "train/vlb": terms.vlb.mean()},
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            batch_size=x0.shape[0],
        )
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.unet, step=self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adamw(self.unet.parameters(), lr=self.optim.lr, weight_decay=self.optim.weight_decay, betas=tuple(self.optim.betas))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["timestep_sampler"] = self.timestep_sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.timestep_sampler.load_state_dict(checkpoint.get("timestep_sampler", {}))


@dataclass
class UNetExport:
    """An exported sampling model: the EMA U-Net's weights and what is needed to use them."""

    unet: UNetConfig
    process: ProcessConfig = field(default_factory=ProcessConfig)
    step: int = -1


def save_unet_export(unet: UNet2DModel, export: UNetExport, path: str | Path) -> Path:
    """Write the export folder ``path`` with diffusers' ``save_pretrained`` (``diffusion_pytorch_model.safetensors``
    + ``config.json``, the tus keys under ``"_tus"``, see :mod:`tus.models.export`); returns the folder."""
    folder = Path(path)
    folder = folder.with_suffix("") if folder.suffix == ".safetensors" else folder
    if folder.exists():
        raise FileExistsError(f"{folder}: exists; an export is never overwritten")
    config = {
        "architecture": {"library": "diffusers", "name": type(unet).__name__},
        "in_chans": export.unet.in_channels,
        "image_size": export.unet.sample_size,
        "normalization": unet_normalization(export.unet.in_channels),
        **json.loads(json.dumps(asdict(export))),  # unet, process, step as plain JSON types
    }
    return save_export(folder, "unet", unet, config)


def export_stem(run_dir: str | Path, step: int) -> Path:
    """The export folder of a run that reached ``step``."""
    return Path(run_dir) / "export" / f"ema_unet_step{step:07d}"


def latest_export(run_dir: str | Path) -> Path | None:
    """The run's export with the most training steps (a resumed run exports again when it ends): an export folder,
    or an old ``ema_unet_step*.safetensors`` file."""
    exports = [p for p in (Path(run_dir) / "export").glob("ema_unet_step*") if p.is_dir() or p.suffix == ".safetensors"]
    # Zero-padded steps sort as text; at the same step the folder (the current format) wins.
    return max(exports, key=lambda p: (p.name.removesuffix(".safetensors"), p.is_dir()), default=None)


def load_unet_export(path: str | Path) -> tuple[UNet2DModel, UNetExport]:
    """Read an export written by :func:`save_unet_export`: its folder, ``config.json`` or weights file, or an old
    ``NAME.safetensors`` + ``NAME.json``.

    A folder is read by diffusers' ``from_pretrained`` from the local files only and from safetensors only (never a
    pickle, never the hub); an old export's weights go through :func:`tus.models.weights.load_weights`. An export of
    another kind (an encoder, a fine-tuned classifier) is refused saying which kind it is.
    """
    try:
        weights, config = read_export_config(path, "unet")
    except CheckpointError as error:
        raise DiffusionCheckpointError(str(error)) from error
    export = from_dict(UNetExport, {k: config[k] for k in ("unet", "process", "step") if k in config}, where=str(path))
    if config["format_version"] == 0:
        unet = build_unet(export.unet)
        _load_state(unet, _read_weights(weights), weights)
        return unet, export
    try:
        unet = UNet2DModel.from_pretrained(str(weights.parent), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise DiffusionCheckpointError(f"{weights}: not a loadable diffusers U-Net export ({detail})") from error
    return unet, export


def load_ema_from_checkpoint(path: str | Path) -> tuple[UNet2DModel, UNetExport]:
    """The EMA U-Net of a Lightning checkpoint of :class:`DiffusionModule` (read by ``load_weights``)."""
    path = Path(path)
    if not path.is_file():
        raise DiffusionCheckpointError(f"{path}: checkpoint not found")
    checkpoint = _read_weights(path)
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if not isinstance(hparams, dict) or "unet" not in hparams or "state_dict" not in checkpoint:
        raise DiffusionCheckpointError(f"{path}: not a DiffusionModule checkpoint (no 'unet' hyper-parameters)")
    export = UNetExport(
        unet=from_dict(UNetConfig, hparams["unet"], where=f"{path}:unet"),
        process=from_dict(ProcessConfig, hparams.get("process", {}), where=f"{path}:process"),
        step=int(checkpoint.get("global_step", -1)),
    )
    prefix = "ema.module."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    unet = build_unet(export.unet)
    _load_state(unet, state, path)
    return unet, export


def _read_weights(path: Path) -> dict:
    """A safely loaded weights file (no TorchScript: a U-Net is never one), as DiffusionCheckpointError."""
    try:
        loaded = load_weights(path)
    except CheckpointError as error:
        raise DiffusionCheckpointError(str(error)) from error
    if not isinstance(loaded, dict):
        raise DiffusionCheckpointError(f"{path}: holds a {type(loaded).__name__}, not diffusion weights")
    return loaded


def _load_state(unet: UNet2DModel, state: dict, source: Path) -> None:
    try:
        missing, unexpected = unet.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensor shapes differ from the config's; torch lists each on its own line
        details = "; ".join(line.strip() for line in str(error).splitlines()[1:4] if line.strip()) or str(error)
        raise DiffusionCheckpointError(f"{source}: weights do not fit the U-Net config ({details})") from error
    if missing or unexpected:
        raise DiffusionCheckpointError(f"{source}: weights do not fit the U-Net config (missing: {missing[:5]}, unexpected: {unexpected[:5]})")
