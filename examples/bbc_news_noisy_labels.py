"""The main demo (``make demo``): fine-tune MiniLM-L6 on BBC News with flipped labels, plain vs weightwise.

Both runs share seed, data order, model and schedule; the second adds one callback,
``LossReweighting``. The table compares clean-test accuracy and wall time, and shows what the
callback did: the weight the mislabelled samples received against the clean ones, how many of
the samples it weighted lowest are in fact mislabelled, and how many of the samples with the
highest loss EMA in weightwise's score store are (the signal that pruning and sampling build on). Runs log to Weights & Biases offline
(``runs/wandb``; ``wandb sync`` uploads them later).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from examples.bbc_news import BBCNewsDataModule, MiniLMClassifier
from weightwise.callbacks import LossReweighting


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--label-noise", type=float, default=0.3, help="fraction of training labels flipped")
    parser.add_argument("--strategy", default="quadratic", help="LossReweighting strategy")
    parser.add_argument("--temperature", type=float, default=0.5, help="the paper's r")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per article")
    parser.add_argument("--limit-train", type=int, default=None, help="use only this many training articles")
    parser.add_argument("--limit-test", type=int, default=None, help="use only this many test articles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where W&B writes its offline runs")
    parser.add_argument("--no-wandb", action="store_true", help="log nothing (no W&B run directory)")
    return parser.parse_args(argv)


def train(args: argparse.Namespace, name: str, callbacks: list[pl.Callback]) -> dict[str, float]:
    pl.seed_everything(args.seed, verbose=False)
    data = BBCNewsDataModule(
        batch_size=args.batch_size,
        max_length=args.max_length,
        label_noise=args.label_noise,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        seed=args.seed,
    )
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
        log_every_n_steps=5,
        num_sanity_val_steps=0,
    )
    if logger:
        logger.experiment  # start the W&B run now, so its start-up is not counted as training time
    start = time.perf_counter()
    trainer.fit(model, data)
    result = {"accuracy": float(trainer.callback_metrics["val_acc"]), "seconds": time.perf_counter() - start}
    if logger:
        logger.experiment.finish()
    result["flipped"] = data.flipped
    return result


def weighting_report(callback: LossReweighting, flipped: torch.Tensor) -> dict[str, float]:
    """How the last weights each sample received line up with the known label noise."""
    scores = callback.reducer.scores
    weight = scores.weight
    n_flipped = int(flipped.sum())
    lowest_weight = torch.argsort(weight)[:n_flipped]
    highest_loss = torch.argsort(scores.ema, descending=True)[:n_flipped]
    return {
        "weight_flipped": float(weight[flipped].mean()),
        "weight_clean": float(weight[~flipped].mean()),
        "flipped_among_lowest": float(flipped[lowest_weight].float().mean()),
        "flipped_among_highest_loss": float(flipped[highest_loss].float().mean()),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    plain = train(args, "plain", callbacks=[])
    reweighting = LossReweighting(args.strategy, temperature=args.temperature)
    weighted = train(args, f"weightwise-{args.strategy}", callbacks=[reweighting])
    report = weighting_report(reweighting, weighted["flipped"])
    noise = f"{args.label_noise:.0%}"

    rows = [
        ("", "plain", f"weightwise ({args.strategy}, r={args.temperature:g})"),
        ("clean test accuracy", f"{plain['accuracy']:.4f}", f"{weighted['accuracy']:.4f}"),
        ("wall time (s)", f"{plain['seconds']:.1f}", f"{weighted['seconds']:.1f}"),
        ("mean weight, flipped labels", "1 (mean loss)", f"{report['weight_flipped']:.3f}"),
        ("mean weight, clean labels", "1 (mean loss)", f"{report['weight_clean']:.3f}"),
        (f"flipped among lowest-weighted {noise}", "-", f"{report['flipped_among_lowest']:.1%} (chance: {noise})"),
        (
            f"flipped among highest-loss {noise} (score store EMA)",
            "-",
            f"{report['flipped_among_highest_loss']:.1%} (chance: {noise})",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"\nBBC News, MiniLM-L6, {noise} of training labels flipped, {args.epochs} epoch(s), seed {args.seed}")
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * width for width in widths))
    if not args.no_wandb:
        print(f"\nW&B offline runs in {args.out / 'wandb'} (upload later with `wandb sync`).")


if __name__ == "__main__":
    main()
