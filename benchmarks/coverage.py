"""CCS against Data Diet at 30-90% pruning on the BBC News frozen-embedding task (issue 15).

Coverage-centric coreset selection (Zheng et al., ICLR 2023; ``weightwise.samplers.CoverageSampler``)
against Data Diet's EL2N top-k (``ScorePruningSampler``), with and without ``skip_hardest``, and a
static random subset of the same size (``CoverageSampler(strata=1)``: one stratum, uniform) - all
scored by the same forward-only EL2N pass after the same warm-up. The task is
``benchmarks/pruning_accuracy.py``'s ``--task embeddings``: a linear classifier (SGD, momentum 0.9,
lr 0.05, batch 32) on frozen MiniLM-L6 sentence embeddings of BBC News, 1,780 training / 445 clean
test articles, clean or with a fraction of training labels flipped.

Methods, at pruning rate p (kept: 1 - p of the training set):

* ``full``: every sample every epoch, no weightwise (once per noise level and seed);
* ``random``: a static uniform subset (chosen after the warm-up, like the others);
* ``dd``: Data Diet, the highest EL2N;
* ``dd_skip``: Data Diet skipping the ``beta(p)`` highest first (``skip_hardest``);
* ``ccs_b0``: CCS without hard cutoff (pure coverage over 50 EL2N strata);
* ``ccs``: CCS with hard cutoff ``beta(p)``.

``beta(p)`` grows with the pruning rate as in CCS's tuning (the authors' README uses 0.3 at 90% on
CIFAR-10): 0.1 at 30% and 50%, 0.2 at 70%, 0.3 at 90% (``--betas``). It was fixed before any run,
not tuned on this test set.

Run:
    .venv/bin/python -m benchmarks.coverage --epochs 30 --warmup 3 --seeds 0,1,2 --noise 0.0,0.3

Prints one row per (noise, method, rate): accuracy mean over seeds and each seed's value, and the
share of forward/backward passes against full training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl

from benchmarks.pruning_accuracy import embeddings_task, fit_timed
from weightwise.callbacks import DataPruning
from weightwise.samplers import CoverageSampler, EpochSampler, ScorePruningSampler

METHODS = ("random", "dd", "dd_skip", "ccs_b0", "ccs")
BETAS = {0.3: 0.1, 0.5: 0.1, 0.7: 0.2, 0.9: 0.3}


def make(method: str, n: int, rate: float, beta: float, warmup: int, seed: int) -> EpochSampler:
    keep = round(1.0 - rate, 6)
    common = {"warmup_epochs": warmup, "seed": seed}
    if method == "random":
        return CoverageSampler(n, keep, strata=1, **common)
    if method == "dd":
        return ScorePruningSampler(n, keep, score="el2n", **common)
    if method == "dd_skip":
        return ScorePruningSampler(n, keep, score="el2n", skip_hardest=beta, **common)
    if method == "ccs_b0":
        return CoverageSampler(n, keep, score="el2n", **common)
    if method == "ccs":
        return CoverageSampler(n, keep, score="el2n", skip_hardest=beta, **common)
    raise ValueError(method)


def run(method: str | None, rate: float, noise: float, seed: int, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    sampler_for = None if method is None else lambda n: make(method, n, rate, args.betas[rate], args.warmup, seed)
    model, loader, val, n = embeddings_task(seed, noise, sampler_for)
    pruning = DataPruning() if method else None
    trainer, seconds = fit_timed(model, loader, val, args.epochs, pruning)
    visited = pruning.ledger["samples_visited"] if pruning else n * args.epochs
    return {"accuracy": float(trainer.callback_metrics["val_acc"]), "passes": visited / (n * args.epochs), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="full-data epochs before the EL2N scoring pass")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--noise", default="0.0,0.3")
    parser.add_argument("--rates", default="0.3,0.5,0.7,0.9", help="pruning rates (fraction removed)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--betas", default=",".join(f"{r}:{b}" for r, b in BETAS.items()), help="rate:beta pairs")
    parser.add_argument("--out", type=Path, help="write every run's numbers here (JSON)")
    args = parser.parse_args()
    args.betas = {float(r): float(b) for r, b in (pair.split(":") for pair in args.betas.split(","))}
    seeds = [int(s) for s in args.seeds.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    results: list[dict] = []
    for noise in (float(x) for x in args.noise.split(",")):
        for seed in seeds:
            results.append({"noise": noise, "seed": seed, "method": "full", "rate": 0.0, **run(None, 0.0, noise, seed, args)})
            print(results[-1], flush=True)
            for rate in rates:
                for method in args.methods.split(","):
                    results.append({"noise": noise, "seed": seed, "method": method, "rate": rate, **run(method, rate, noise, seed, args)})
                    print(results[-1], flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(f"\nepochs={args.epochs} warmup={args.warmup} seeds={seeds} betas={args.betas}")
    print("| noise | method | pruned | beta | accuracy (mean) | per seed | passes (% of full) |")
    print("| ---: | --- | ---: | ---: | ---: | --- | ---: |")
    keys = sorted({(r["noise"], r["rate"], r["method"]) for r in results}, key=lambda k: (k[0], k[1], METHODS.index(k[2]) if k[2] in METHODS else -1))
    for noise, rate, method in keys:
        rows = [r for r in results if (r["noise"], r["rate"], r["method"]) == (noise, rate, method)]
        accuracies = [r["accuracy"] for r in rows]
        beta = args.betas.get(rate, 0.0) if method in ("dd_skip", "ccs") else 0.0
        print(
            f"| {noise:.1f} | {method} | {100 * rate:.0f}% | {beta:.1f} | {100 * statistics.mean(accuracies):.2f} |"
            f" {' / '.join(f'{100 * a:.2f}' for a in accuracies)} | {100 * statistics.mean(r['passes'] for r in rows):.1f}% |"
        )


if __name__ == "__main__":
    main()
