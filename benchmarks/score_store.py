"""The score store at pre-training scale: bytes per sample, update and plan time, N up to 1e9.

For each N: the store InfoBatch needs (the latest loss), in process memory and - for the largest N -
memory-mapped (``SampleScoreStore(path=...)``); the median time of one update (a batch of ids and
losses) and of one InfoBatch epoch plan from the filled store; the store's bytes per sample and the
process' peak RSS. A plan needs a permutation of N int64 ids (8 bytes per sample) besides the
store: at N = 1e9 that alone is 8 GB.

Run (from the repository root):
    .venv/bin/python -m benchmarks.score_store [--sizes 1e6,1e8,1e9] [--mmap-dir benchmarks/.cache/store]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
from pathlib import Path

import torch

from benchmarks.timing import median_seconds
from weightwise import SampleScoreStore
from weightwise.samplers import InfoBatchSampler


def median_ms(fn, repeats: int) -> float:
    return 1000 * median_seconds(fn, repeats)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def fill(store: SampleScoreStore, n: int, chunk: int = 1 << 24) -> None:
    """Every sample seen once, chunk by chunk (as an epoch of training would)."""
    generator = torch.Generator().manual_seed(0)
    for start in range(0, n, chunk):
        ids = torch.arange(start, min(start + chunk, n))
        store.update(ids, torch.rand(ids.numel(), generator=generator), step=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e8,1e9")
    parser.add_argument("--mmap-from", type=float, default=1e9, help="memory-map stores of at least this many samples")
    parser.add_argument("--mmap-dir", type=Path, default=Path("benchmarks/.cache/store"))
    parser.add_argument("--plan-up-to", type=float, default=1e9, help="plan epochs for stores up to this size")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {platform.processor() or platform.machine()}")
    print("| N | layout | bytes/sample | update, batch 256 (us) | update, batch 4096 (us) | InfoBatch plan (s) | peak RSS (GiB) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in (int(float(size)) for size in args.sizes.split(",")):
        mmap = n >= args.mmap_from
        path = args.mmap_dir / f"n{n}" if mmap else None
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        store = SampleScoreStore(n, fields=InfoBatchSampler(1).store_fields, path=path)
        fill(store, n)
        os.sync()  # a memory-mapped store's first write-back is behind it: time the steady state
        updates = []
        for batch in (256, 4096):
            batches = iter([(torch.randint(0, n, (batch,)), torch.rand(batch)) for _ in range(args.repeats + 1)])
            updates.append(1000 * median_ms(lambda store=store: store.update(*next(batches), step=1), args.repeats))
        plan = "-"
        if n <= args.plan_up_to:
            sampler = InfoBatchSampler(n, prune_ratio=0.5, num_epochs=10, num_replicas=1, rank=0)
            sampler.attach_scores(store)
            sampler.set_epoch(1)

            def plan_epoch():
                sampler.refresh()
                return sampler.plan

            plan = f"{median_ms(plan_epoch, 3) / 1000:.2f}"
        layout = "memory-mapped" if mmap else "in memory"
        print(f"| {n:,} | {layout} | {store.bytes_per_sample} | {updates[0]:.1f} | {updates[1]:.1f} | {plan} | {peak_rss_gib():.2f} |", flush=True)
        del store
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
