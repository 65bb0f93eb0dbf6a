"""Masked-autoencoder reconstructions while pretraining: original / masked / reconstruction grids as PNG in the
run directory (``reconstructions/step_XXXXXXX.png``) and in W&B, every N optimizer steps and after the last."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from tus.data.transforms import NORMALIZE_MEAN, NORMALIZE_STD

ROWS = ("original", "masked", "reconstruction")


class ReconstructionGrid(Callback):
    """Every ``every_n_steps`` optimizer steps (and after the last), reconstruct ``num_images`` fixed images.

    The module must provide ``reconstruct(images, seed) -> {"original", "masked", "reconstruction"}`` (tensors
    (B, 1, H, W) in the normalised input space). The images are the first ``num_images`` of the first training
    batch this process sees, kept so every grid shows the same images under the same mask. Rows of the grid:
    original, masked, reconstruction. ``folder`` None is ``<trainer.default_root_dir>/reconstructions``.
    ``written`` lists the PNGs. Rank zero only (the weights are the same on every rank).
    """

    def __init__(self, every_n_steps: int, folder: str | Path | None = None, num_images: int = 8):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be > 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.folder = Path(folder) if folder is not None else None
        self.num_images = num_images
        self.images: torch.Tensor | None = None
        self.written: list[Path] = []
        self._last_step = -1

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.images is None:
            self.images = batch["image"][: self.num_images].detach().clone()
        step = trainer.global_step
        # With gradient accumulation several batches share one optimizer step; draw it once.
        if (step % self.every_n_steps == 0 or step == trainer.max_steps) and step != self._last_step:
            self._last_step = step
            self.write(trainer, pl_module, step)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Path:
        rows = pl_module.reconstruct(self.images.to(pl_module.device))
        images = torch.cat([rows[name] for name in ROWS]).float().cpu()
        # Back from the normalised input space to [0, 1].
        images = (images * NORMALIZE_STD + NORMALIZE_MEAN).clamp(0.0, 1.0)
        grid = make_grid(images, nrow=len(self.images), padding=2, pad_value=1.0)
        folder = self.folder or Path(trainer.default_root_dir) / "reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step:07d}.png"
        save_image(grid, path)
        self.written.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="reconstructions", images=[str(path)], caption=[" / ".join(ROWS)], step=step)
        return path
