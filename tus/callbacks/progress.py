"""One progress bar per stage, with an ETA over the stage's whole budget.

Pretraining and diffusion count optimizer steps up to ``trainer.max_steps``. A CV stage runs
one Trainer per fold x seed; they all advance one shared bar counted in epochs
(folds x seeds x max_epochs), so the ETA is for the whole CV, not for one fold. Lightning's
own per-epoch bars (and their validation bars) are replaced, which keeps logs readable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from tqdm.auto import tqdm

_shared: list[tqdm] = []


@contextmanager
def stage_progress(total: float, *, desc: str, unit: str = "epoch", enabled: bool = True) -> Iterator[tqdm | None]:
    """A bar that every Trainer built inside this block advances (see :class:`StageProgressBar`)."""
    if not enabled:
        yield None
        return
    # The count is fractional (epochs advance by batches): shown to one decimal, so a bar never
    # reads 5.999999999999998/6.
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:g} " + unit + " [{elapsed}<{remaining}{postfix}]"
    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, bar_format=bar_format)
    _shared.append(bar)
    try:
        yield bar
    finally:
        _shared.remove(bar)
        bar.close()


def active_stage_bar() -> tqdm | None:
    """The bar of the innermost :func:`stage_progress` block, if any."""
    return _shared[-1] if _shared else None


class StageProgressBar(ProgressBar):
    """Advances the stage's shared bar (by epochs) or, alone, its own bar over ``max_steps``."""

    def __init__(self, shared: tqdm | None = None, desc: str = "") -> None:
        super().__init__()
        self._shared = shared
        self._own: tqdm | None = None
        self._desc = desc
        self._enabled = True
        self._epoch_start = 0.0  # the shared bar's count when this epoch began

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def _bar(self) -> tqdm | None:
        return self._shared if self._shared is not None else self._own

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._shared is None and self._enabled and trainer.is_global_zero:
            total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
            self._own = tqdm(total=total, initial=trainer.global_step, desc=self._desc, unit="step", dynamic_ncols=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._shared is not None:
            self._epoch_start = self._shared.n

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A finished epoch counts exactly one, whatever its batches added up to in floating point.
        if self._shared is not None and self._enabled and trainer.is_global_zero:
            self._set_shared(self._epoch_start + 1)

    def _set_shared(self, count: float) -> None:
        assert self._shared is not None
        self._shared.n = count
        self._shared.update(0)  # redraw (at tqdm's usual rate)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self._bar
        if bar is None or not self._enabled or not trainer.is_global_zero:
            return
        if self._shared is not None:
            batches = max(trainer.num_training_batches, 1)
            self._set_shared(self._epoch_start + min(batch_idx + 1, batches) / batches)
        else:
            bar.update(trainer.global_step - bar.n)
        loss = trainer.callback_metrics.get("loss", trainer.callback_metrics.get("train/loss"))
        if loss is not None:
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._own is not None:
            self._own.close()
            self._own = None
