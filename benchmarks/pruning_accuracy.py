"""Accuracy vs compute of every pruning policy against full-data training with the same seed.

Tasks (both on the real BBC News corpus, with an optional fraction of training labels flipped):

* ``bbc``: fine-tune MiniLM-L6 (the demo's model and data module), a few epochs.
* ``embeddings``: a linear classifier trained for many epochs on frozen MiniLM-L6 sentence
  embeddings (computed once and cached) - cheap steps, so weightwise's own overhead shows.

Data Diet policies (``el2n*``) score the training set with a forward-only pass in eval mode without
gradients, before the epoch that needs the scores (``scoring="pass"``, the papers' and weightwise's
default). Each has a ``*_training`` twin with ``scoring="training"`` (weightwise 0.1: scores
recorded by the training steps, every rescoring epoch a full training epoch), so both can be
compared in one invocation - back to back, which matters for wall times on a shared machine.

Run (from the repository root), e.g.:
    .venv/bin/python -m benchmarks.pruning_accuracy --task embeddings --epochs 30 --noise 0.3
    .venv/bin/python -m benchmarks.pruning_accuracy --task embeddings --epochs 30 --noise 0.3 \
        --policies full,el2n_dynamic,el2n_dynamic_training --repeats 3
    .venv/bin/python -m benchmarks.pruning_accuracy --task bbc --epochs 5 --noise 0.3 --rescore-every 2 \
        --policies full,el2n_dynamic,el2n_dynamic_training

Prints a markdown table: final clean-test accuracy; training passes (forward + backward, samples
visited by training steps) as a share of full-data training; scoring passes (forward-only, no
grad, samples scored) as a share of the same; fit wall time (with ``--repeats n`` the policies run
round-robin n times and the median is shown; accuracy and passes are taken from the first round)
and the seconds of it the scoring passes took; the share of wall time saved; and the efficiency
ratio (fraction of wall time saved divided by fraction of training passes saved; 1.0 means skipping
a sample saves all of its cost, scoring passes being part of the cost).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from examples.bbc_news import (
    BBCNewsDataModule,
    MiniLMClassifier,
    flip_labels,
    load_bbc_news,
    minilm_path,
)
from weightwise import IndexedDataset
from weightwise.callbacks import DataPruning
from weightwise.losses import el2n
from weightwise.samplers import EpochSampler, make_sampler

# benchmark row name -> (weightwise.samplers.make_sampler policy, its arguments)
VARIANTS = {
    "infobatch": ("infobatch", {"prune_ratio": 0.7}),
    "rs2": ("rs2", {"fraction": 0.5}),
    "importance": ("importance", {"fraction": 0.5}),
    "el2n": ("el2n", {"keep_fraction": 0.5, "warmup_epochs": 1}),
    "el2n_offset": ("el2n", {"keep_fraction": 0.5, "warmup_epochs": 1, "skip_hardest": 0.3}),
    "el2n_dynamic": ("el2n", {"keep_fraction": 0.5, "warmup_epochs": 1, "rescore_every": 5, "skip_hardest": 0.3}),
}
# each Data Diet policy followed by its twin with weightwise 0.1's scores from training steps
VARIANTS = {
    key: value
    for name, (policy, settings) in VARIANTS.items()
    for key, value in [(name, (policy, settings))]
    + ([(f"{name}_training", (policy, {**settings, "scoring": "training"}))] if policy == "el2n" else [])
}


# ---------------------------------------------------------------- embeddings task
def cached_embeddings(max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    cache = ROOT / "benchmarks" / ".cache" / f"bbc_minilm_{max_length}.pt"
    if cache.exists():
        return torch.load(cache)
    from transformers import AutoModel, AutoTokenizer

    texts, labels, _ = load_bbc_news()
    tokenizer, encoder = AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path()).eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            enc = tokenizer(texts[start : start + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            hidden = encoder(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            chunks.append((hidden * mask).sum(1) / mask.sum(1))
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save((torch.cat(chunks), labels), cache)
    return torch.cat(chunks), labels


class EmbeddingClassifier(pl.LightningModule):
    def __init__(self, dim: int, num_classes: int = 5, lr: float = 0.05, per_sample_loss: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.head = torch.nn.Linear(dim, num_classes)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self.head(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        if not self.hparams.per_sample_loss:
            return losses.mean()
        return {"loss": losses, "scores": {"el2n": el2n(logits, y)}}

    def validation_step(self, batch, batch_idx):
        self.val_accuracy(self.head(batch[0]), batch[1])
        self.log("val_acc", self.val_accuracy)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def embeddings_task(seed: int, noise: float, sampler_for: Callable[[int], EpochSampler] | None):
    """The frozen-embedding task for one seed: ``(model, train loader, clean test loader, N)``.

    ``sampler_for(N)`` builds the training sampler; ``None`` trains on shuffled full data with a
    mean loss. The seed draws the 445 test articles and the flipped labels.
    """
    features, labels = cached_embeddings()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    test, train = order[:445], order[445:]
    noisy, _ = flip_labels(labels[train], noise, 5, gen)
    train_set = TensorDataset(features[train], noisy)
    sampler = None if sampler_for is None else sampler_for(len(train_set))
    loader = DataLoader(IndexedDataset(train_set), batch_size=32, shuffle=sampler is None, sampler=sampler)
    val = DataLoader(TensorDataset(features[test], labels[test]), batch_size=256)
    return EmbeddingClassifier(features.shape[1], per_sample_loss=sampler is not None), loader, val, len(train_set)


def fit_timed(model: pl.LightningModule, train: DataLoader, val: DataLoader, epochs: int, pruning: DataPruning | None):
    """Fit for ``epochs`` (validating once, at the end); returns the trainer and the fit's seconds."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=epochs,
        callbacks=[pruning] if pruning else [],
    )
    start = time.perf_counter()
    trainer.fit(model, train, val)
    return trainer, time.perf_counter() - start


def embeddings_run(policy: str | None, args: argparse.Namespace):
    settings = VARIANTS.get(policy)
    sampler_for = None if settings is None else lambda n: make_sampler(settings[0], n, seed=args.seed, **settings[1])
    return embeddings_task(args.seed, args.noise, sampler_for)


def bbc_run(policy: str | None, args: argparse.Namespace):
    sampler_policy, sampler_args = VARIANTS[policy] if policy else (None, None)
    data = BBCNewsDataModule(label_noise=args.noise, seed=args.seed, pruning_policy=sampler_policy, pruning_args=sampler_args)
    data.setup()
    return MiniLMClassifier(per_sample_loss=policy is not None), data.train_dataloader(), data.val_dataloader(), len(data.train_set)


def run(policy: str | None, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(args.seed, verbose=False)
    model, train, val, n = (bbc_run if args.task == "bbc" else embeddings_run)(policy, args)
    pruning = DataPruning() if policy else None
    trainer, seconds = fit_timed(model, train, val, args.epochs, pruning)
    ledger = pruning.ledger if pruning else {"samples_visited": n * args.epochs, "samples_scored": 0, "scoring_seconds": 0.0}
    return {
        "accuracy": float(trainer.callback_metrics["val_acc"]), "seconds": seconds, "visited": ledger["samples_visited"],
        "scored": ledger["samples_scored"], "scoring_seconds": ledger["scoring_seconds"], "full": n * args.epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["bbc", "embeddings"], default="embeddings")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default="full," + ",".join(VARIANTS), help=f"full and any of {list(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the policies; the median fit time is shown")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rescore-every", type=int, default=None, help="override the dynamic policies' rescore_every (5)")
    args = parser.parse_args()
    if args.rescore_every is not None:
        for _, settings in VARIANTS.values():
            if "rescore_every" in settings:
                settings["rescore_every"] = args.rescore_every
    names = args.policies.split(",")
    if unknown := [n for n in names if n != "full" and n not in VARIANTS]:
        parser.error(f"unknown policies {unknown}; choose from full and {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    rounds: dict[str, list[dict[str, float]]] = {}
    for round_ in range(args.repeats):
        for name in names:
            rounds.setdefault(name, []).append(run(None if name == "full" else name, args))
            print(f"round {round_} {name} -> {rounds[name][-1]}", flush=True)
    results = {}
    for name, runs in rounds.items():
        results[name] = {**runs[0], "seconds": statistics.median(r["seconds"] for r in runs)}
        if len({(r["accuracy"], r["visited"], r["scored"]) for r in runs}) > 1:
            print(f"note: {name}'s accuracy or passes differ between rounds: {[(r['accuracy'], r['visited']) for r in runs]}")
    full = results.get("full")
    print(f"\ntask={args.task} epochs={args.epochs} noise={args.noise} seed={args.seed} repeats={args.repeats}"
          f" (fit s: {'median of the rounds' if args.repeats > 1 else 'one run'})")
    print("| policy | settings | accuracy | Δ vs full (points) | training passes (% of full) | scoring passes, forward only"
          " (% of full) | fit s | of which scoring s | time saved | efficiency |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        passes, scored = r["visited"] / r["full"], r["scored"] / r["full"]
        delta = f"{100 * (r['accuracy'] - full['accuracy']):+.2f}" if full else "-"
        saved_time = 1 - r["seconds"] / full["seconds"] if full else float("nan")
        efficiency = saved_time / (1 - passes) if full and passes < 1 else float("nan")
        print(
            f"| {name} | {VARIANTS[name][1] if name in VARIANTS else ''} | {r['accuracy']:.4f} | {delta} | {100 * passes:.1f}% |"
            f" {100 * scored:.1f}% | {r['seconds']:.1f} | {r['scoring_seconds']:.1f} | {100 * saved_time:.1f}% | {efficiency:.2f} |"
        )


if __name__ == "__main__":
    main()
