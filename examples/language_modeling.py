"""Causal language modelling on real text shipped with Python: its own standard-library sources.

A byte-level tokenisation (vocabulary 256) keeps it download-free. ``CausalLM`` builds a small
transformers model from scratch (``family``: ``llama`` for layerwise sampling, ``mixtral`` for
expert upcycling) and returns the per-sequence loss when ``per_sample_loss`` (for weightwise
reweighting/pruning) or its mean otherwise.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from weightwise import IndexedDataset
from weightwise.losses import sequence_loss


def stdlib_bytes(limit: int) -> Tensor:
    """Up to ``limit`` bytes of the running Python's standard-library ``*.py`` files, concatenated."""
    chunks, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= limit:
            break
    return torch.tensor(list(b"".join(chunks)[:limit]), dtype=torch.long)


class Windows(Dataset):
    def __init__(self, data: Tensor, length: int) -> None:
        self.data, self.length = data, length

    def __len__(self) -> int:
        return self.data.numel() // self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        window = self.data[i * self.length : (i + 1) * self.length]
        return {"input_ids": window, "labels": window}


class StdlibTextDataModule(pl.LightningDataModule):
    """Non-overlapping windows of ``seq_len`` bytes; the last 5% of the text is held out."""

    def __init__(self, n_bytes: int = 1_000_000, seq_len: int = 64, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        data = stdlib_bytes(self.hparams.n_bytes)
        split = int(0.95 * data.numel())
        self.train_set = Windows(data[:split], self.hparams.seq_len)
        self.val_set = Windows(data[split:], self.hparams.seq_len)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(IndexedDataset(self.train_set), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


class CausalLM(pl.LightningModule):
    """A small transformers causal LM trained from scratch.

    Args:
        family: ``"llama"`` or ``"mixtral"`` (MoE; ``num_experts``, ``top_k``).
        hidden_size, num_layers: model size.
        per_sample_loss: return one loss per sequence (weightwise callbacks) or the mean.
    """

    def __init__(
        self,
        family: str = "llama",
        hidden_size: int = 64,
        num_layers: int = 4,
        num_experts: int = 4,
        top_k: int = 2,
        lr: float = 3e-3,
        per_sample_loss: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        common = dict(vocab_size=256, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4)
        if family == "llama":
            self.model = LlamaForCausalLM(LlamaConfig(**common))
        elif family == "mixtral":
            self.model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=num_experts, num_experts_per_tok=top_k))
        else:
            raise ValueError(f"family must be 'llama' or 'mixtral', got {family!r}")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int):
        out = self.model(input_ids=batch["input_ids"])
        losses = sequence_loss(out.logits, batch["labels"], shift=True)
        return losses if self.hparams.per_sample_loss else losses.mean()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
