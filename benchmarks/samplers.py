"""Cost of planning one epoch with each weightwise sampler at N = 10 million samples.

Run: .venv/bin/python benchmarks/samplers.py [--n 10000000]
Measures, per policy, the time to plan an epoch from a filled score store (InfoBatch pruning half
of the below-mean samples, importance sampling with 10M draws, ...), the time to shard it and
walk this rank's ids the way a DataLoader does, and the plan's memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from weightwise import SampleScoreStore
from weightwise.samplers import (
    ImportanceSampler,
    InfoBatchSampler,
    RandomSubsetSampler,
    ScorePruningSampler,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--replicas", type=int, default=2, help="plan as rank 0 of this many ranks")
    parser.add_argument("--repeats", type=int, default=5, help="plans timed per policy (median reported)")
    args = parser.parse_args()
    n = args.n
    store = SampleScoreStore(num_samples=n)
    ids = torch.arange(n)
    store.update(ids, torch.rand(n) * 3, step=0)
    store.record("el2n", ids, torch.rand(n))
    common = dict(num_replicas=args.replicas, rank=0)
    samplers = {
        "InfoBatch (r=0.5)": InfoBatchSampler(n, 0.5, num_epochs=10, **common),
        "RS2 (50%, no replacement)": RandomSubsetSampler(n, 0.5, **common),
        "Importance (100% draws)": ImportanceSampler(n, 1.0, **common),
        "Data Diet EL2N (keep 50%)": ScorePruningSampler(n, 0.5, **common),
    }
    print(f"N = {n:,}, rank 0 of {args.replicas}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'policy':<28} {'plan s':>7} {'walk s':>7} {'plan ids':>12} {'plan MiB':>9}")
    for name, sampler in samplers.items():
        sampler.attach_scores(store)
        sampler.set_epoch(1)
        times = []
        for _ in range(args.repeats):
            sampler.refresh()
            if isinstance(sampler, ScorePruningSampler):
                sampler._selection = None  # time the ranking too, not only the per-epoch shuffle
            start = time.perf_counter()
            plan = sampler.plan
            times.append(time.perf_counter() - start)
        planned = statistics.median(times)
        start = time.perf_counter()
        count = sum(1 for _ in sampler)
        walked = time.perf_counter() - start
        mib = (plan.indices.numel() * 8 + (0 if plan.weights is None else plan.weights.numel() * 4)) / 2**20
        assert count == len(sampler)
        print(f"{name:<28} {planned:>7.3f} {walked:>7.3f} {plan.indices.numel():>12,} {mib:>9.1f}")
    print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
