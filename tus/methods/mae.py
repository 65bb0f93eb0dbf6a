"""Masked-autoencoder pretraining of a ViT (He et al. 2022, "Masked Autoencoders Are Scalable Vision
Learners"; the USF-MAE recipe for ultrasound), the second method of the pretraining registry.

Each image is resized and lightly augmented (random resized crop of scale 0.2-1 and horizontal flip, the
paper's only augmentations, Sec. 4 / Appendix A.1); 75 % of its patches are masked at random, the timm ViT
encoder sees the visible patches only and a lightweight decoder predicts the pixels of every patch; the loss
is the MSE on the masked patches of per-patch normalised pixels (:class:`tus.models.mae.MaskedAutoencoderViT`).
AdamW (betas 0.9/0.95, weight decay 0.05 except on norms and biases, as MAE's ``main_pretrain.py``), peak
``lr = base_lr x global batch / 256``, linear warmup then cosine decay over ``trainer.max_steps``.

Organ labels do not enter the MAE loss. So that the stage's organ probe can report how separable the organs
are, ``organ_head`` is an online linear probe: a linear classifier trained on the *detached* class token of the
visible-patch encoding (no gradient reaches the encoder). Masks are drawn from a generator seeded by (run seed,
DDP rank, optimizer step, micro-batch), so a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tus.config import ConfigError, to_dict
from tus.data.pools import PretrainDataConfig
from tus.data.transforms import AlbumentationsTransform
from tus.data.views import RANK_SEED_STRIDE
from tus.losses.contrastive import organ_accuracy, organ_ce_loss
from tus.losses.mae import mae_loss, normalize_patches, patchify, random_masking, unpatchify
from tus.methods.base import PretrainingMethod
from tus.models.backbones import BackboneConfig, save_encoder
from tus.models.mae import MaskedAutoencoderViT
from tus.models.vit import mae_param_groups
from tus.optim import ScheduleConfig, adamw, scaled_lr, schedule_lambda


@dataclass
class MaeOptimizerConfig:
    """AdamW as in He et al. 2022, Appendix A.1 (Tab. 8): ``lr = base_lr x global batch / 256``."""

    base_lr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05


@dataclass
class MaskedAutoencoderConfig:
    """The ``method:`` block of ``method.name: mae``.

    ``image_size`` must equal ``data.image_size`` (the method is built before it sees the data).
    ``patch_size`` None keeps the one in the encoder's name. ``crop_scale``/``hflip_p`` are the augmentation.
    ``organ_probe_weight`` scales the online organ probe's loss (0 freezes it; it never reaches the encoder).
    """

    encoder: str = "vit_tiny_patch16_224"
    image_size: int = 224
    patch_size: int | None = None
    global_pool: str = "token"
    mask_ratio: float = 0.75
    decoder_depth: int = 8
    decoder_embed_dim: int = 512
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip_p: float = 0.5
    organ_probe_weight: float = 1.0
    optimizer: MaeOptimizerConfig = field(default_factory=MaeOptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=0, decay="cosine"))
    # Reconstruction grids (tus.callbacks.reconstruction, attached by the pretraining stage; 0: none).
    reconstruction_every_n_steps: int = 100
    reconstruction_images: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.patch_size is not None and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.organ_probe_weight < 0:
            raise ValueError(f"organ_probe_weight must be >= 0, got {self.organ_probe_weight}")


class MaskedImageTransform:
    """uint8 (H, W) image -> one normalised (1, S, S) tensor: random resized crop + horizontal flip.

    Seeded and reseeded like :class:`tus.data.views.ViewPairTransform` (``reseed``, ``set_rank``), so the pool
    datamodule drives it unchanged.
    """

    def __init__(self, image_size: int, crop_scale: tuple[float, float] = (0.2, 1.0), hflip_p: float = 0.5, seed: int = 0, rank: int = 0):
        self.seed = seed
        self.rank = rank
        # Bicubic resampling, as the reference's RandomResizedCrop(interpolation=3).
        augmentations = [
            A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(crop_scale), interpolation=3, p=1.0),
            A.HorizontalFlip(p=hflip_p),
        ]
        self.view = AlbumentationsTransform(augmentations, seed=self._stream_seed(seed))

    def _stream_seed(self, seed: int) -> int:
        return (seed + self.rank * RANK_SEED_STRIDE) % (2**32)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.view.reseed(self._stream_seed(seed))

    def set_rank(self, rank: int) -> None:
        self.rank = rank
        self.reseed(self.seed)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.view(image)


def mask_seed(seed: int, rank: int, step: int, micro_batch: int) -> int:
    """The seed of one micro-batch's masks, independent across ranks, steps and micro-batches."""
    return int(np.random.SeedSequence([seed, rank, step, micro_batch]).generate_state(1)[0])


class MaskedAutoencoder(PretrainingMethod):
    """MAE on the pretraining pool; ``encoder`` is the timm ViT (pooled features), exported for fine-tuning.

    ``batch_size`` is per device; the global batch (x world size x gradient accumulation) scales the lr.
    """

    Config = MaskedAutoencoderConfig

    def __init__(self, config: MaskedAutoencoderConfig, *, num_organs: int, batch_size: int):
        super().__init__()
        self.save_hyperparameters({"method": to_dict(config), "num_organs": num_organs, "batch_size": batch_size})
        self.config = config
        self.batch_size = batch_size
        # The stage seeds torch with the run seed right before building the method; masks derive from it.
        self.seed = torch.initial_seed() % (2**32)
        self.model = MaskedAutoencoderViT(
            config.encoder,
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=1,
            global_pool=config.global_pool,
            decoder_embed_dim=config.decoder_embed_dim,
            decoder_depth=config.decoder_depth,
            decoder_num_heads=config.decoder_num_heads,
            norm_pix_loss=config.norm_pix_loss,
            drop_path_rate=config.drop_path_rate,
        )
        # The online organ probe (see the module docstring); frozen without organs or weight, like SimCLR's head.
        self.organ_head = nn.Linear(self.encoder.embed_dim, max(num_organs, 1))
        self.organ_head.requires_grad_(num_organs > 0 and config.organ_probe_weight > 0)

    @property
    def encoder(self) -> nn.Module:
        """The timm ViT inside the MAE (a property, so checkpoints hold its weights once)."""
        return self.model.encoder

    @classmethod
    def train_transform(cls, config: MaskedAutoencoderConfig, data: PretrainDataConfig, seed: int) -> MaskedImageTransform:
        """One resized, lightly augmented view per image (``batch["image"]`` is a (B, 1, S, S) tensor)."""
        if config.image_size != data.image_size:
            raise ConfigError(f"method.image_size ({config.image_size}) must equal data.image_size ({data.image_size})")
        return MaskedImageTransform(data.image_size, config.crop_scale, config.hflip_p, seed=seed)

    def encoder_kwargs(self) -> dict:
        """Keyword arguments of :func:`tus.models.vit.create_vit_encoder` that rebuild :attr:`encoder`'s architecture.

        Not recorded: ``drop_path_rate`` (a training choice) and ``fc_norm`` (MAE pretraining needs the final norm,
        ``fc_norm=False``; fine-tuning's head follows its own ``global_pool``, with a fresh ``fc_norm`` for ``avg``
        as MAE's main_finetune.py and the ``init=mae`` path).
        """
        kwargs = {k: v for k, v in self.model.encoder_kwargs.items() if k not in ("drop_path_rate", "fc_norm")}
        return {**kwargs, "patch_size": self.model.patch_size}

    def export_encoder(self, path: Path, extra: dict) -> None:
        """``save_encoder`` plus ``vit``: the kwargs for :func:`tus.models.vit.create_vit_from_export`."""
        backbone = BackboneConfig(name=self.config.encoder, in_chans=1, init="scratch")
        save_encoder(self.encoder, backbone, path, extra={**extra, "vit": self.encoder_kwargs()})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features of full images (what is exported and fine-tuned)."""
        return self.encoder(images)

    def masked_forward(self, images: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Mask, encode the visible patches, decode: ``pred`` (B, L, p*p), ``mask`` (B, L), ``latent`` (B, 1+kept, D)."""
        model = self.model
        ids_keep, mask, ids_restore = random_masking(images.shape[0], model.num_patches, self.config.mask_ratio, generator=generator, device=images.device)
        latent = model.forward_encoder(images, ids_keep)
        return {"pred": model.forward_decoder(latent, ids_restore), "mask": mask, "latent": latent}

    def mask_generator(self, batch_idx: int) -> torch.Generator:
        trainer = self._trainer
        rank, step, micro = (trainer.global_rank, trainer.global_step, batch_idx % trainer.accumulate_grad_batches) if trainer else (0, 0, 0)
        return torch.Generator(device=self.device).manual_seed(mask_seed(self.seed, rank, step, micro))

    def compute_losses(self, images: torch.Tensor, organs: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """``loss`` (MAE, plus the online probe's CE when it trains) and the logged terms."""
        out = self.masked_forward(images, generator)
        # Detached: the probe measures the representation, it must not shape it.
        logits = self.organ_head(out["latent"][:, 0].detach()).float()
        # The MSE in float32 under bf16 autocast: the per-patch normalisation divides by small variances.
        with torch.autocast(images.device.type, enabled=False):
            loss_mae = mae_loss(out["pred"].float(), patchify(images.float(), self.model.patch_size), out["mask"], norm_pix_loss=self.config.norm_pix_loss)
            loss_organ = organ_ce_loss(logits, organs)
        loss = loss_mae + self.config.organ_probe_weight * loss_organ if self.organ_head.weight.requires_grad else loss_mae
        return {"loss": loss, "loss_mae": loss_mae.detach(), "loss_organ_probe": loss_organ.detach(), "organ_acc": organ_accuracy(logits.detach(), organs)}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, organs = batch["image"], batch["organ"]
        results = self.compute_losses(images, organs, self.mask_generator(batch_idx))
        count = images.shape[0]
        logged = {"loss": results["loss_mae"], **{k: v for k, v in results.items() if k != "loss"}}
        self.log_dict({f"train/{name}": value.detach() for name, value in logged.items()}, on_step=True, batch_size=count, sync_dist=True)
        self.log("loss", results["loss_mae"], prog_bar=True, logger=False, batch_size=count)
        return results["loss"]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        """(original, masked, reconstruction) images (B, 1, H, W), in the normalised input space.

        Masked patches are grey (0) in ``masked``. With ``norm_pix_loss`` the predictions are per-patch
        normalised, so they are mapped back with each patch's own mean and std (as the reference's
        visualisation does); ``reconstruction`` keeps the visible patches as they were.
        """
        was_training = self.training
        self.eval()
        try:
            generator = torch.Generator(device=images.device).manual_seed(seed)
            out = self.masked_forward(images, generator)
        finally:
            self.train(was_training)
        patch, grid = self.model.patch_size, self.model.grid_hw
        target = patchify(images.float(), patch)
        pred = out["pred"].float()
        if self.config.norm_pix_loss:
            mean, std = target.mean(dim=-1, keepdim=True), (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
            pred = pred * std + mean
        mask = out["mask"].unsqueeze(-1)
        return {
            "original": images.float(),
            "masked": unpatchify(target * (1 - mask), patch, 1, grid),
            "reconstruction": unpatchify(target * (1 - mask) + pred * mask, patch, 1, grid),
        }

    def global_batch_size(self) -> int:
        trainer = self.trainer
        return self.batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def configure_optimizers(self):
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps <= 0:
            raise ValueError("pretraining is bounded by trainer.max_steps (a fixed step budget); set it > 0")
        settings = self.config.optimizer
        groups = mae_param_groups(self.model, settings.weight_decay)
        if self.organ_head.weight.requires_grad:
            groups.append({"name": "organ_probe", "params": list(self.organ_head.parameters()), "weight_decay": 0.0})
        lr = scaled_lr(settings.base_lr, self.global_batch_size())
        optimizer = adamw(groups, lr=lr, betas=tuple(settings.betas))
        scheduler = LambdaLR(optimizer, schedule_lambda(total_steps, self.config.schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def predict_mean_loss(images: torch.Tensor, patch_size: int, norm_pix_loss: bool = True) -> float:
    """The MAE loss of predicting the mean, the floor a useful decoder must beat.

    Masks are uniform over patches, so the expected loss over masked patches is the mean over all patches.
    With ``norm_pix_loss`` the prediction is each patch's normalised mean, 0 (the loss is the mean squared
    normalised pixel, a little under 1); without it, the mean pixel of ``images`` (the best constant).
    """
    target = patchify(images.float(), patch_size)
    if norm_pix_loss:
        return float((normalize_patches(target) ** 2).mean())
    return float(F.mse_loss(torch.full_like(target, float(target.mean())), target))
