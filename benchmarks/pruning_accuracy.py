"""Accuracy vs compute of every pruning policy against full-data training with the same seed.

Tasks (both on the real BBC News corpus, with an optional fraction of training labels flipped):

* ``bbc``: fine-tune MiniLM-L6 (the demo's model and data module), a few epochs.
* ``embeddings``: a linear classifier trained for many epochs on frozen MiniLM-L6 sentence
  embeddings (computed once and cached) - cheap steps, so weightwise's own overhead shows.

Run, e.g.:
    .venv/bin/python -m benchmarks.pruning_accuracy --task bbc --epochs 3 --noise 0.3
    .venv/bin/python -m benchmarks.pruning_accuracy --task embeddings --epochs 30 --noise 0.3

Prints a markdown table: final clean-test accuracy, forward/backward passes (samples visited)
against full data, fit wall time, and the efficiency ratio (fraction of wall time saved divided
by fraction of passes saved; 1.0 means skipping a sample saves all of its cost).
"""

from __future__ import annotations

import argparse
import os
import time
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
from weightwise.samplers import make_sampler

# benchmark row name -> (weightwise.samplers.make_sampler policy, its arguments)
VARIANTS = {
    "infobatch": ("infobatch", {"prune_ratio": 0.7}),
    "rs2": ("rs2", {"fraction": 0.5}),
    "importance": ("importance", {"fraction": 0.5}),
    "el2n": ("el2n", {"keep_fraction": 0.5, "warmup_epochs": 1}),
    "el2n_offset": ("el2n", {"keep_fraction": 0.5, "warmup_epochs": 1, "skip_hardest": 0.3}),
    "el2n_dynamic": ("el2n", {"keep_fraction": 0.5, "warmup_epochs": 1, "rescore_every": 5, "skip_hardest": 0.3}),
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


def embeddings_run(policy: str | None, args: argparse.Namespace):
    features, labels = cached_embeddings()
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(labels), generator=gen)
    test, train = order[:445], order[445:]
    noisy, _ = flip_labels(labels[train], args.noise, 5, gen)
    train_set = TensorDataset(features[train], noisy)
    sampler = None if policy is None else make_sampler(VARIANTS[policy][0], len(train_set), seed=args.seed, **VARIANTS[policy][1])
    loader = DataLoader(IndexedDataset(train_set), batch_size=32, shuffle=sampler is None, sampler=sampler)
    val = DataLoader(TensorDataset(features[test], labels[test]), batch_size=256)
    return EmbeddingClassifier(features.shape[1], per_sample_loss=policy is not None), loader, val, len(train_set)


def bbc_run(policy: str | None, args: argparse.Namespace):
    sampler_policy, sampler_args = VARIANTS[policy] if policy else (None, None)
    data = BBCNewsDataModule(label_noise=args.noise, seed=args.seed, pruning_policy=sampler_policy, pruning_args=sampler_args)
    data.setup()
    return MiniLMClassifier(per_sample_loss=policy is not None), data.train_dataloader(), data.val_dataloader(), len(data.train_set)


def run(policy: str | None, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(args.seed, verbose=False)
    model, train, val, n = (bbc_run if args.task == "bbc" else embeddings_run)(policy, args)
    pruning = DataPruning() if policy else None
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=args.epochs,
        callbacks=[pruning] if pruning else [],
    )
    start = time.perf_counter()
    trainer.fit(model, train, val)
    seconds = time.perf_counter() - start
    visited = pruning.ledger["samples_visited"] if pruning else n * args.epochs
    return {"accuracy": float(trainer.callback_metrics["val_acc"]), "seconds": seconds, "visited": visited, "full": n * args.epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["bbc", "embeddings"], default="embeddings")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default="full," + ",".join(VARIANTS), help=f"full and any of {list(VARIANTS)}")
    args = parser.parse_args()
    results = {}
    for name in args.policies.split(","):
        results[name] = run(None if name == "full" else name, args)
        print(f"{name} -> {results[name]}", flush=True)
    full = results.get("full")
    print(f"\ntask={args.task} epochs={args.epochs} noise={args.noise} seed={args.seed}")
    print("| policy | settings | accuracy | Δ vs full (points) | passes (% of full) | fit s | time saved | efficiency |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        passes = r["visited"] / r["full"]
        delta = f"{100 * (r['accuracy'] - full['accuracy']):+.2f}" if full else "-"
        saved_time = 1 - r["seconds"] / full["seconds"] if full else float("nan")
        efficiency = saved_time / (1 - passes) if full and passes < 1 else float("nan")
        print(
            f"| {name} | {VARIANTS[name][1] if name in VARIANTS else ''} | {r['accuracy']:.4f} | {delta} | {100 * passes:.1f}% |"
            f" {r['seconds']:.1f} | {100 * saved_time:.1f}% | {efficiency:.2f} |"
        )


if __name__ == "__main__":
    main()
