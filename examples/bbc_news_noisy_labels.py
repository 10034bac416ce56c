"""The main demo (``make demo``): fine-tune MiniLM-L6 on BBC News with 30% of the labels flipped.

What weightwise is for, on a task with a known ground truth (the flipped labels): the same model,
seed and schedule trained

* ``plain`` - every sample, every epoch, the mean loss;
* ``rs2`` - RS2 (``RandomSubsetSampler``): each epoch a fresh half of the data - half the passes;
* ``importance`` - importance sampling by the loss EMA (``ImportanceSampler``), half the draws,
  unbiased ``1/(N p)`` weights;
* ``reweighting`` - Sow et al.'s loss reweighting (``quadratic``): made for LLM pre-training,
  here as the honest contrast: on noisy labels it up-weights the mislabelled articles.

The table: clean-test accuracy, passes over the data and wall time per run, and how well the score
store's loss EMA finds the flipped labels (the share of flipped labels among the 30% highest-EMA
articles). Runs log to Weights & Biases offline (``runs/wandb``; ``wandb sync`` uploads them
later): the weights' histogram, the pruning ledger (``DataPruning`` logs it, ``weightwise/ledger/*``),
and ``SampleReport``'s table of the most suspicious articles - text, given label, loss EMA, weight.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from examples.bbc_news import BBCNewsDataModule, MiniLMClassifier
from weightwise.callbacks import DataPruning, LossReweighting, SampleReport, SampleWeightCallback

RUNS = ("plain", "rs2", "importance", "reweighting")
PRUNING = {"rs2": ("rs2", {"fraction": 0.5}), "importance": ("importance", {"fraction": 0.5})}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--label-noise", type=float, default=0.3, help="fraction of training labels flipped")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per article")
    parser.add_argument("--limit-train", type=int, default=None, help="use only this many training articles")
    parser.add_argument("--limit-test", type=int, default=None, help="use only this many test articles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where W&B writes its offline runs")
    parser.add_argument("--no-wandb", action="store_true", help="log nothing (no W&B run directory)")
    return parser.parse_args(argv)


def callbacks_for(name: str, data: BBCNewsDataModule) -> list[pl.Callback]:
    """The weightwise callbacks of a run (none for ``plain``), with the report of suspicious articles."""
    if name == "plain":
        return []

    def describe(i: int) -> dict[str, object]:
        return {"text": data.train_texts[i][:160], "given label": data.classes[int(data.train_set.labels[i])], "flipped": bool(data.flipped[i])}

    # The reference's 1000-step warm-up would cover this whole run (about 110 steps): no warm-up.
    weighting = LossReweighting("quadratic", warmup_steps=0) if name == "reweighting" else DataPruning()
    return [weighting, SampleReport(k=10, describe=describe)]


def train(args: argparse.Namespace, name: str) -> dict[str, object]:
    pl.seed_everything(args.seed, verbose=False)
    policy, policy_args = PRUNING.get(name, (None, None))
    data = BBCNewsDataModule(
        batch_size=args.batch_size,
        max_length=args.max_length,
        label_noise=args.label_noise,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        seed=args.seed,
        pruning_policy=policy,
        pruning_args=policy_args,
    )
    data.setup()
    callbacks = callbacks_for(name, data)
    model = MiniLMClassifier(per_sample_loss=bool(callbacks))
    logger = False if args.no_wandb else WandbLogger(project="weightwise-demo", name=name, save_dir=args.out, offline=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
        use_distributed_sampler=policy is None,
        default_root_dir=args.out,  # SampleReport's CSV lands here without W&B
    )
    if logger:
        logger.experiment  # start the W&B run now, so its start-up is not counted as training time
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    pruning = next((cb for cb in callbacks if isinstance(cb, DataPruning)), None)
    passes = 1.0 if pruning is None else pruning.ledger["samples_visited"] / pruning.ledger["samples_full"]
    if logger:  # DataPruning logged its ledger (weightwise/ledger/*) itself: the summary holds the totals
        logger.experiment.finish()
    store = next((cb.reducer.scores for cb in callbacks if isinstance(cb, SampleWeightCallback)), None)
    return {"accuracy": float(trainer.callback_metrics["val_acc"]), "seconds": seconds, "passes": passes,
            "flipped": data.flipped, "store": store}


def share_flipped_among(rank_by: torch.Tensor, flipped: torch.Tensor, largest: bool = True) -> float:
    """The share of flipped labels among the ``flipped.sum()`` samples ranked first by ``rank_by``."""
    n = int(flipped.sum())
    order = torch.argsort(rank_by.float().nan_to_num(float("-inf") if largest else float("inf")), descending=largest)
    return float(flipped[order[:n]].float().mean())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    names = [name for name in args.runs.split(",") if name]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {RUNS}")
    results = {name: train(args, name) for name in names}
    noise = f"{args.label_noise:.0%}"
    cell: dict[str, Callable[[dict], str]] = {
        "clean test accuracy": lambda r: f"{r['accuracy']:.4f}",
        "passes over the data": lambda r: f"{r['passes']:.0%}",
        "wall time (s)": lambda r: f"{r['seconds']:.0f}",
        f"flipped among the highest loss EMA {noise}": lambda r: "-" if r["store"] is None else f"{share_flipped_among(r['store'].ema[: len(r['flipped'])], r['flipped']):.0%}",
        "mean weight, flipped / clean": lambda r: "-" if r["store"] is None or "weight" not in r["store"].fields else
        "{:.2f} / {:.2f}".format(*(float(r["store"].weight[: len(r["flipped"])][m].float().nanmean()) for m in (r["flipped"], ~r["flipped"]))),
    }
    rows = [["", *names]] + [[label, *(render(results[name]) for name in names)] for label, render in cell.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\nBBC News, MiniLM-L6, {noise} of training labels flipped, {args.epochs} epoch(s), seed {args.seed} (chance: {noise})")
    for i, row in enumerate(rows):
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * width for width in widths))
    if not args.no_wandb:
        print(f"\nW&B offline runs in {args.out / 'wandb'} (upload later with `wandb sync`): weights, ledger, suspicious articles.")


if __name__ == "__main__":
    main()
