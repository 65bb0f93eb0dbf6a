"""Images/s of PretrainModule under a Lightning Trainer vs a plain PyTorch SimCLR loop.

Both train the same model (encoder + projection head + organ head, same initial weights) on
the same pre-drawn batch with the same losses, LARS optimiser and schedule, so the ratio
measures what Lightning's loop (hooks, logging, precision plugin) costs. Data loading is
left out on purpose: both loops get an already collated batch. Also reports peak memory
per image: process RSS above the pre-run level on CPU (sampled, psutil), or
``torch.cuda.max_memory_allocated`` on GPU. Target: ratio >= 0.9.

    python benchmarks/pretrain_throughput.py                       # CPU-sized defaults
    python benchmarks/pretrain_throughput.py --image-size 224 --batch-size 256 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import lightning as L
import psutil
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from tus.methods.simclr_organ import PretrainLossConfig, PretrainModelConfig, PretrainModule
from tus.models.backbones import BackboneConfig
from tus.optim import LarsConfig, ScheduleConfig, build_lars, scaled_lr, schedule_lambda


class RepeatedBatch(Dataset):
    """The same collated batch ``length`` times (a DataLoader with batch_size=None)."""

    def __init__(self, batch: dict, length: int):
        self.batch = batch
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batch


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or sampled process RSS."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._process = psutil.Process()
            self._base = self._process.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss - self._base)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()


class StepTimer(Callback):
    """Wall time from the first timed step's start to the last step's end."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            _synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _synchronize(pl_module.device)
        self.end = time.perf_counter()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def new_module(args) -> PretrainModule:
    torch.manual_seed(0)
    model = PretrainModelConfig(backbone=BackboneConfig(name=args.model, init="scratch"))
    return PretrainModule(model, PretrainLossConfig(), LarsConfig(), ScheduleConfig(warmup_steps=2), num_organs=2, batch_size=args.batch_size)


def make_batch(args) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 1, args.image_size, args.image_size)
    views = [torch.randn(shape, generator=generator) for _ in range(2)]
    return {"image": views, "organ": torch.randint(0, 2, (args.batch_size,), generator=generator)}


def plain_loop(args, batch: dict, device: torch.device) -> tuple[float, int]:
    """The reference: forward, the same losses, backward, LARS step, scheduler step."""
    module = new_module(args).to(device).train()
    optimizer = build_lars(module, module.optimizer_config, scaled_lr(module.optimizer_config.lr_per_256, args.batch_size))
    scheduler = LambdaLR(optimizer, schedule_lambda(args.warmup + args.steps, module.schedule_config))
    views = [v.to(device) for v in batch["image"]]
    organs = batch["organ"].to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed" else contextlib.nullcontext()
    with PeakMemory(device) as memory:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                _synchronize(device)
                start = time.perf_counter()
            with autocast:
                loss = module.compute_losses(views, organs)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        _synchronize(device)
        elapsed = time.perf_counter() - start
    return args.steps * args.batch_size / elapsed, memory.peak_bytes


def lightning_loop(args, batch: dict, device: torch.device) -> tuple[float, int]:
    module = new_module(args)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = DataLoader(RepeatedBatch(batch, args.warmup + args.steps), batch_size=None)
    with PeakMemory(device) as memory:
        trainer.fit(module, train_dataloaders=loader)
    return args.steps * args.batch_size / (timer.end - timer.start), memory.peak_bytes


def measure(variant: str, args) -> tuple[float, int]:
    """One timed run of ``variant`` (``plain`` or ``lightning``), in the calling process."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loop = plain_loop if variant == "plain" else lightning_loop
    return loop(args, make_batch(args), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two loops this many times; best of each is kept")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    results = {"plain": [], "lightning": []}
    # Every run gets a fresh process, so neither inherits the other's allocator pools (which
    # would hide its memory growth from RSS) or warmed-up caches.
    spawn = multiprocessing.get_context("spawn")
    for _ in range(args.rounds):
        for variant in results:
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                results[variant].append(pool.submit(measure, variant, args).result())
    print(f"{args.model} {args.image_size}px, batch {args.batch_size} x 2 views, {args.precision}, {args.device}, {args.threads} thread(s), {args.steps} timed steps")
    best = {}
    for name, runs in results.items():
        speeds = ", ".join(f"{ips:.1f}" for ips, _ in runs)
        best[name] = max(runs)
        ips, peak = best[name]
        print(f"{name:>9}: {ips:8.1f} images/s (rounds: {speeds}); peak memory {peak / 2**20:.0f} MiB = {peak / args.batch_size / 2**20:.2f} MiB/image")
    ratio = best["lightning"][0] / best["plain"][0]
    print(f"ratio lightning / plain = {ratio:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
