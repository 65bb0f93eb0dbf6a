"""Time and peak memory of the k-NN manifold filter against a naive full-matrix baseline.

Cases (real x generated 2048-d random float32 features): 880 x 20,000 (the reference's scale)
and 25,000 x 1,000,000. Generated features are produced and filtered in chunks, so memory stays
bounded by the real features plus one chunk and one distance block; the naive baseline
(torch.cdist over the whole matrices, as torch-fidelity's prc does) runs only where its
matrices fit in the memory budget. Each measurement runs in a fresh process, so its peak RSS
is its own; filter times exclude generating the random features.

    python benchmarks/filter_scale.py           # full sizes (25k x 1M takes about 10 min on 2 cores)
    python benchmarks/filter_scale.py --quick   # sizes / 10, a smoke check
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time

import numpy as np
import torch

from tus.eval.manifold import kth_neighbour_radii, manifold_membership

DIM = 2048
FULL_CASES = ((880, 20_000), (25_000, 1_000_000))
QUICK_CASES = ((88, 2_000), (2_500, 100_000))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _real(count: int) -> torch.Tensor:
    return torch.randn(count, DIM, generator=torch.Generator().manual_seed(0))


def _generated_chunks(count: int, chunk: int):
    for index, start in enumerate(range(0, count, chunk)):
        size = min(chunk, count - start)
        yield torch.randn(size, DIM, generator=torch.Generator().manual_seed(1 + index)) * 1.02


def _blocked(n_real: int, n_generated: int, k: int, chunk: int, block_size: int | None, results) -> None:
    start_rss = _peak_rss_mib()
    real = _real(n_real)
    began = time.perf_counter()
    radii = kth_neighbour_radii(real, k, block_size)
    radii_s = time.perf_counter() - began
    membership_s, inside_parts, done = 0.0, [], 0
    for generated in _generated_chunks(n_generated, chunk):
        began = time.perf_counter()
        inside, _ = manifold_membership(real, radii, generated, block_size)
        membership_s += time.perf_counter() - began
        inside_parts.append(inside)
        done += len(generated)
        if n_generated >= 100_000 and (done // chunk) % max(1, (n_generated // chunk) // 10) == 0:
            print(f"    blocked {n_real} x {n_generated}: {done}/{n_generated} after {membership_s:.0f} s", flush=True)
    results.put(
        {
            "radii_s": radii_s,
            "membership_s": membership_s,
            "inside": np.concatenate(inside_parts),
            "start_rss_mib": start_rss,
            "peak_rss_mib": _peak_rss_mib(),
        }
    )


def _naive(n_real: int, n_generated: int, k: int, chunk: int, results) -> None:
    start_rss = _peak_rss_mib()
    real = _real(n_real)
    generated = torch.cat(list(_generated_chunks(n_generated, chunk)))
    began = time.perf_counter()
    radii = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # +1: the zero self-distance
    radii_s = time.perf_counter() - began
    began = time.perf_counter()
    inside = (torch.cdist(generated, real) / radii).amin(dim=1) <= 1.0
    results.put(
        {
            "radii_s": radii_s,
            "membership_s": time.perf_counter() - began,
            "inside": inside.numpy(),
            "start_rss_mib": start_rss,
            "peak_rss_mib": _peak_rss_mib(),
        }
    )


def _in_fresh_process(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=target, args=(*args, results))
    process.start()
    outcome = results.get()
    process.join()
    return outcome


def _report(name: str, outcome: dict) -> None:
    total = outcome["radii_s"] + outcome["membership_s"]
    print(
        f"  {name:<8} radii {outcome['radii_s']:8.2f} s  membership {outcome['membership_s']:8.2f} s  "
        f"total {total:8.2f} s  peak RSS {outcome['peak_rss_mib']:8.0f} MiB "
        f"(+{outcome['peak_rss_mib'] - outcome['start_rss_mib']:.0f} over the idle process)  "
        f"kept {int(outcome['inside'].sum())}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shrink every case by 10 for a smoke check")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=16384, help="generated features per streamed chunk")
    parser.add_argument("--block-size", type=int, default=None, help="rows per distance block (default: 128 MiB blocks)")
    parser.add_argument("--memory-budget-gib", type=float, default=None, help="naive baseline limit (default: half of RAM)")
    args = parser.parse_args()
    budget = args.memory_budget_gib or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**31
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dim {DIM}, k {args.k}", flush=True)
    for n_real, n_generated in QUICK_CASES if args.quick else FULL_CASES:
        print(f"{n_real} real x {n_generated} generated", flush=True)
        blocked = _in_fresh_process(_blocked, n_real, n_generated, args.k, args.chunk, args.block_size)
        _report("blocked", blocked)
        naive_gib = 4 * (n_real * n_real + n_generated * (n_real + DIM) + n_real * DIM) / 2**30
        if naive_gib > budget:
            print(f"  naive    skipped: its full matrices need {naive_gib:.1f} GiB (budget {budget:.1f} GiB)", flush=True)
            continue
        naive = _in_fresh_process(_naive, n_real, n_generated, args.k, args.chunk)
        _report("naive", naive)
        agree = int((naive["inside"] == blocked["inside"]).sum())
        time_ratio = (naive["radii_s"] + naive["membership_s"]) / (blocked["radii_s"] + blocked["membership_s"])
        memory_ratio = (naive["peak_rss_mib"] - naive["start_rss_mib"]) / max(1.0, blocked["peak_rss_mib"] - blocked["start_rss_mib"])
        print(
            f"  naive / blocked: time x{time_ratio:.2f}, extra memory x{memory_ratio:.2f}; same decision for {agree}/{n_generated} generated",
            flush=True,
        )


if __name__ == "__main__":
    main()
