"""Images/s of a pretraining method (``--method simclr``: SimCLR + organ head, SimCLROrgan;
``--method mae``: the masked autoencoder, MaskedAutoencoder) in the Trainer the stage builds (precision 'auto', ChannelsLast('auto')) vs the fastest plain PyTorch loop for
this hardware (fp32 NCHW, fp32 channels_last, bf16 where native; see benchmarks/common.py).

Both train the same model (SimCLR: encoder + projection head + organ head with LARS; MAE: ViT
encoder + decoder + organ probe with AdamW; same initial weights) on the same pre-drawn batch
with the same losses (MAE: the same per-step masks), optimiser and schedule, so the ratio
measures what the tus loop (hooks, logging, precision plugin) costs. Data loading is left
out on purpose: both loops get an already collated batch. Each run gets a fresh process.
Also reports peak memory per image: process RSS above the pre-run level on CPU (sampled,
psutil), or ``torch.cuda.max_memory_allocated`` on GPU. Target: ratio >= 0.95.

    python benchmarks/pretrain_throughput.py                       # CPU-sized defaults
    python benchmarks/pretrain_throughput.py --device cuda --image-size 224 --batch-size 256
    python benchmarks/pretrain_throughput.py --method mae          # ViT-tiny, 8 px patches, 64 px
    python benchmarks/pretrain_throughput.py --method mae --device cuda --model vit_base_patch16_224 \
        --patch-size 16 --image-size 224 --batch-size 256 --decoder-depth 8 --decoder-dim 512
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Self

import psutil
import torch
from common import (
    Setting,
    StepTimer,
    machine_line,
    plain_settings,
    report,
    scratch_cache,
    time_steps,
    timing_arguments,
    tus_trainer,
)
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from tus.methods.mae import MaeOptimizerConfig, MaskedAutoencoder, MaskedAutoencoderConfig, mask_seed
from tus.methods.simclr_organ import (
    PretrainLossConfig,
    PretrainModelConfig,
    SimCLROrgan,
    SimCLROrganConfig,
)
from tus.models.backbones import BackboneConfig
from tus.models.vit import mae_param_groups
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

    def __enter__(self) -> Self:
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


def new_module(args) -> SimCLROrgan | MaskedAutoencoder:
    torch.manual_seed(0)
    if args.method == "mae":
        config = MaskedAutoencoderConfig(
            encoder=args.model,
            image_size=args.image_size,
            patch_size=args.patch_size,
            decoder_depth=args.decoder_depth,
            decoder_embed_dim=args.decoder_dim,
            decoder_num_heads=args.decoder_heads,
            schedule=ScheduleConfig(warmup_steps=2),
            reconstruction_every_n_steps=0,
        )
        return MaskedAutoencoder(config, num_organs=2, batch_size=args.batch_size)
    model = PretrainModelConfig(backbone=BackboneConfig(name=args.model, init="scratch"))
    return SimCLROrgan(SimCLROrganConfig(model, PretrainLossConfig(), LarsConfig(), ScheduleConfig(warmup_steps=2)), num_organs=2, batch_size=args.batch_size)


def make_batch(args) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 1, args.image_size, args.image_size)
    organs = torch.randint(0, 2, (args.batch_size,), generator=generator)
    if args.method == "mae":  # one view per image
        return {"image": torch.randn(shape, generator=generator), "organ": organs}
    views = [torch.randn(shape, generator=generator) for _ in range(2)]
    return {"image": views, "organ": organs}


def timed_plain_steps(loss_at, optimizer, scheduler, args, device: torch.device, setting: Setting) -> tuple[float, int]:
    """(images/s, peak bytes) of ``args.steps`` plain steps after ``args.warmup``: ``loss_at(step)`` under
    the setting's autocast, backward, optimiser and scheduler steps."""
    step_index = 0

    def step() -> None:
        nonlocal step_index
        with setting.autocast(device):
            loss = loss_at(step_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step_index += 1

    with PeakMemory(device) as memory:
        elapsed = time_steps(step, args.steps, args.warmup, device)
    return args.steps * args.batch_size / elapsed, memory.peak_bytes


def plain_loop(args, batch: dict, device: torch.device, setting: Setting) -> tuple[float, int]:
    if args.method == "mae":
        return plain_mae_loop(args, batch, device, setting)
    return plain_simclr_loop(args, batch, device, setting)


def plain_mae_loop(args, batch: dict, device: torch.device, setting: Setting) -> tuple[float, int]:
    """The reference: mask (seeded per step, as the method does), forward, MAE + probe loss, backward, AdamW and
    scheduler steps, with the method's parameter groups (no decay on norms/biases/tokens) and batch-scaled lr."""
    module = new_module(args).to(device, memory_format=setting.memory_format()).train()
    settings: MaeOptimizerConfig = module.config.optimizer
    groups = mae_param_groups(module.model, settings.weight_decay)
    groups.append({"name": "organ_probe", "params": list(module.organ_head.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=scaled_lr(settings.base_lr, args.batch_size), betas=tuple(settings.betas), fused=True)
    scheduler = LambdaLR(optimizer, schedule_lambda(args.warmup + args.steps, module.config.schedule))
    images = batch["image"].to(device).contiguous(memory_format=setting.memory_format())
    organs = batch["organ"].to(device)

    def loss_at(step: int) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(mask_seed(module.seed, 0, step, 0))
        return module.compute_losses(images, organs, generator)["loss"]

    return timed_plain_steps(loss_at, optimizer, scheduler, args, device, setting)


def plain_simclr_loop(args, batch: dict, device: torch.device, setting: Setting) -> tuple[float, int]:
    """The reference: forward, the same losses, backward, LARS step, scheduler step."""
    module = new_module(args).to(device, memory_format=setting.memory_format()).train()
    optimizer = build_lars(module, module.optimizer_config, scaled_lr(module.optimizer_config.lr_per_256, args.batch_size))
    scheduler = LambdaLR(optimizer, schedule_lambda(args.warmup + args.steps, module.schedule_config))
    views = [v.to(device).contiguous(memory_format=setting.memory_format()) for v in batch["image"]]
    organs = batch["organ"].to(device)
    return timed_plain_steps(lambda step: module.compute_losses(views, organs)["loss"], optimizer, scheduler, args, device, setting)


def tus_loop(args, batch: dict, device: torch.device) -> tuple[float, int]:
    module = new_module(args)
    timer = StepTimer(args.warmup)
    loader = DataLoader(RepeatedBatch(batch, args.warmup + args.steps), batch_size=None)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = tus_trainer(Path(run_dir), device, args.warmup + args.steps, timer)
        with PeakMemory(device) as memory:
            trainer.fit(module, train_dataloaders=loader)
    return args.steps * args.batch_size / timer.seconds(), memory.peak_bytes


def measure(setting: Setting | None, args) -> tuple[float, int]:
    """One timed run: the plain loop in ``setting``, or the tus Trainer when None."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if setting is None:
        return tus_loop(args, make_batch(args), device)
    return plain_loop(args, make_batch(args), device, setting)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["simclr", "mae"], default="simclr")
    parser.add_argument("--model", default=None, help="timm name (default: resnet18; mae: vit_tiny_patch16_224)")
    parser.add_argument("--patch-size", type=int, default=8, help="mae: ViT patch size")
    parser.add_argument("--decoder-depth", type=int, default=2, help="mae: decoder blocks")
    parser.add_argument("--decoder-dim", type=int, default=128, help="mae: decoder width")
    parser.add_argument("--decoder-heads", type=int, default=4, help="mae: decoder attention heads")
    timing_arguments(parser, image_size=64, batch_size=32, steps=20)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the loops this many times; best of each is kept")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    args.model = args.model or ("vit_tiny_patch16_224" if args.method == "mae" else "resnet18")
    device = torch.device(args.device)
    print(machine_line(device))
    if args.method == "mae":
        print(
            f"MAE pretraining {args.model} (patch {args.patch_size}, decoder {args.decoder_depth} x {args.decoder_dim}) "
            f"{args.image_size}px, batch {args.batch_size}, {args.threads} thread(s), {args.steps} timed steps"
        )
    else:
        print(f"SimCLR pretraining {args.model} {args.image_size}px, batch {args.batch_size} x 2 views, {args.threads} thread(s), {args.steps} timed steps")
    settings: list[Setting | None] = [*plain_settings(device), None]
    results: dict[Setting | None, list[tuple[float, int]]] = {s: [] for s in settings}
    # Every run gets a fresh process, so none inherits another's allocator pools (which
    # would hide its memory growth from RSS) or warmed-up caches.
    spawn = multiprocessing.get_context("spawn")
    with scratch_cache():  # the spawned runs inherit it: tus measures its memory format afresh
        for _ in range(args.rounds):
            for setting in settings:
                with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                    results[setting].append(pool.submit(measure, setting, args).result())
    best = {s: max(runs) for s, runs in results.items()}
    for setting, (_ips, peak) in best.items():
        name = setting.name if setting else "tus"
        print(f"{name:>20}: peak memory {peak / 2**20:.0f} MiB = {peak / args.batch_size / 2**20:.2f} MiB/image")
    plain = {s.name: best[s][0] for s in settings if s is not None}
    report("stage Trainer (auto)", best[None][0], plain, 0.95)


if __name__ == "__main__":
    main()
