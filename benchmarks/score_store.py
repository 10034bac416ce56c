"""Cost of one SampleScoreStore update and of the loss weights, for large N.

Run: .venv/bin/python benchmarks/score_store.py   (results go in benchmarks/RESULTS.md by hand,
with the machine and date). The issue's goal: a million samples must cost milliseconds per
update, not a Python loop, and memory O(N).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from weightwise import SampleScoreStore
from weightwise.losses import loss_weights


def median_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'N':>12} {'batch':>6} {'update ms':>10} {'weights ms':>11} {'store MiB':>10}")
    for n in (1_000_000, 10_000_000):
        store = SampleScoreStore(num_samples=n)
        store.update(torch.arange(n), torch.rand(n), step=0)  # every sample seen once
        fields = (store.loss, store.ema, store.weight, store.count, store.last_step)
        mib = sum(t.numel() * t.element_size() for t in fields) / 2**20
        for batch in (256, 4096):
            ids = torch.randint(0, n, (batch,))
            losses = torch.rand(batch)
            weights = loss_weights(losses, "quadratic")
            update = median_ms(lambda: store.update(ids, losses, step=1, weights=weights), args.repeats)
            weigh = median_ms(lambda: loss_weights(losses, "quadratic"), args.repeats)
            print(f"{n:>12,} {batch:>6} {update:>10.3f} {weigh:>11.3f} {mib:>10.1f}")


if __name__ == "__main__":
    main()
