"""The equal-compute harness: data, model, one training run to a FLOP budget.

Compute is counted and the budget enforced by :class:`weightwise.callbacks.ComputeBudget` (the
project's compute accounting, docs/architecture.md): every forward of every module during the fit
- the trained model's forwards with gradients and their backwards (``model``), online selection's
extra forward (``selection_forward``), reference-model passes (``reference_model``: RHO-LOSS's
irreducible losses, perplexity pruning's scoring pass) - counted by ``FlopCounterMode``. The model
uses eager attention so that its attention products are counted too (FlopCounterMode has no formula
for the CPU SDPA kernel: with ``sdpa`` a 64-byte row's attention would be missing, 14% of its
FLOPs). The reference model's own training is a separate run, reported beside (amortised over every
run that uses it). Held-out evaluations pause the meter: they are measurements, not spending.

Every run stops after the optimizer step that reaches its budget, and its learning rate follows
``budget_lr_lambda`` over the budget fraction spent (linear warm-up, cosine to ``final_lr``), so it
reaches its end value at the budget whatever a method does to the cost of a step.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.equal_compute.corpus import read_documents
from examples.language_modeling import IGNORE_INDEX, pack_documents
from weightwise import IndexedDataset
from weightwise.callbacks import ComputeBudget
from weightwise.compute import Spent, budget_lr_lambda
from weightwise.losses import token_cross_entropy


# ---------------------------------------------------------------- data
@dataclass
class Rows:
    """Packed byte rows of one split: documents of each domain packed back to back (a row holds
    documents of one domain only; ``position_ids`` restart at every document), with each row's
    domain index and text (for text-based methods such as DSIR)."""

    rows: list[dict[str, Tensor]]
    domains: list[str]
    domain_of_row: list[int]

    def texts(self) -> list[str]:
        """Every row's bytes decoded as UTF-8 (invalid bytes replaced)."""
        return [bytes(row["input_ids"].tolist()).decode("utf-8", errors="replace") for row in self.rows]

    def share_by_domain(self) -> dict[str, float]:
        """Fraction of the rows in each domain."""
        counts = torch.bincount(torch.tensor(self.domain_of_row), minlength=len(self.domains))
        return {d: float(c) / len(self.rows) for d, c in zip(self.domains, counts.tolist(), strict=True)}


def load_rows(root: str | Path, seq_len: int, unit: str = "file") -> Rows:
    """Read ``root/<domain>/*.txt`` (:func:`read_documents`) and pack each domain into rows of
    ``seq_len`` bytes (byte-level tokens: vocabulary 256).

    Raises:
        ValueError: see :func:`read_documents`; or no domain fills one row.
    """
    documents = read_documents(root, unit)
    domains = sorted({d.domain for d in documents})
    rows, domain_of_row = [], []
    for index, domain in enumerate(domains):
        texts = (d.text.encode("utf-8") for d in documents if d.domain == domain)
        for row in pack_documents(texts, seq_len):
            row["domain"] = torch.tensor(index)
            rows.append(row)
            domain_of_row.append(index)
    if not rows:
        raise ValueError(f"the documents under {root} hold fewer than seq_len={seq_len} bytes per domain: lower --seq-len")
    return Rows(rows, domains, domain_of_row)


class RowDataset(Dataset):
    """Map-style dataset over :class:`Rows` (wrapped in ``IndexedDataset`` for sample ids)."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows.rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.rows[i]


# ---------------------------------------------------------------- model and FLOPs
@dataclass(frozen=True)
class ModelSize:
    """A byte-level Llama trained from scratch."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4

    def config(self, attention: str = "eager") -> LlamaConfig:
        config = LlamaConfig(vocab_size=256, hidden_size=self.hidden, intermediate_size=2 * self.hidden,
                             num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.heads,
                             max_position_embeddings=2048)
        config._attn_implementation = attention
        return config


def build_model(size: ModelSize) -> LlamaForCausalLM:
    """A freshly initialised model with eager attention (seed it before calling)."""
    return LlamaForCausalLM(size.config())


def flops_per_row(model: LlamaForCausalLM, seq_len: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of one row of ``seq_len`` tokens, counted by ``FlopCounterMode`` on a
    fresh eager-attention model of ``model``'s config (forward with labels, then backward of its loss;
    a fresh model, not a copy, so that no hook of ``model`` runs)."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = "eager"
    clone = type(model)(config)
    clone.train()
    ids = torch.zeros(2, seq_len, dtype=torch.long)
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        loss = clone(input_ids=ids, labels=ids, use_cache=False).loss
    forward = counter.get_total_flops()
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        loss.backward()
    return forward // 2, counter.get_total_flops() // 2


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, rows: Rows, batch_size: int = 32) -> float:
    """Mean next-byte negative log-likelihood (nats) over every target byte of ``rows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows.rows), batch_size):
        batch = rows.rows[start : start + batch_size]
        ids = torch.stack([r["input_ids"] for r in batch])
        logits = model(input_ids=ids, position_ids=torch.stack([r["position_ids"] for r in batch]), use_cache=False).logits
        labels = torch.stack([r["labels"] for r in batch])[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(nll)
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / count


# ---------------------------------------------------------------- the Lightning module
Scores = Callable[[dict[str, Tensor], Tensor, Tensor], dict[str, Tensor]]
"""``(batch, token_losses [B, T], mask [B, T]) -> {name: [B] per-row signal}``."""


class BudgetLM(pl.LightningModule):
    """A byte-level Llama; AdamW with ``budget_lr_lambda`` over the budget (cosine, linear warm-up).

    ``loss_mode="mean"`` returns the mean over the batch's target bytes (plain training, no
    weightwise callback); ``"rows"`` returns token losses and their mask - weightwise's sample is
    the row - plus, with ``scores``, the per-row signals it computes from ``(batch, token_losses,
    mask)`` (DoReMi's excess loss). With every weight 1 the two optimise the same mean. Rows
    backpropagated are counted per domain (``domain_rows``), for the analysis only.
    """

    def __init__(self, model: LlamaForCausalLM, budget: ComputeBudget, *, lr: float, warmup: float, final_lr: float,
                 loss_mode: str, num_domains: int, scores: Scores | None = None) -> None:
        super().__init__()
        self.model, self.budget = model, budget
        self.lr, self.warmup, self.final_lr, self.loss_mode = lr, warmup, final_lr, loss_mode
        self.scores = scores
        self.domain_rows = torch.zeros(num_domains, dtype=torch.long)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | dict[str, Tensor]:
        logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        if torch.is_grad_enabled():
            self.domain_rows += torch.bincount(batch["domain"].cpu(), minlength=len(self.domain_rows))
        tokens, mask = token_cross_entropy(logits, batch["labels"], shift=True)
        if self.loss_mode == "mean":
            return (tokens * mask).sum() / mask.sum()
        if self.scores is None:
            return {"loss": tokens, "mask": mask}
        return {"loss": tokens, "mask": mask, "scores": self.scores(batch, tokens, mask)}

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.01)
        factor = budget_lr_lambda(self.budget, "cosine", warmup_fraction=self.warmup, final_lr_fraction=self.final_lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def spent_dict(spent: Spent) -> dict[str, Any]:
    """A :class:`weightwise.compute.Spent` as plain numbers (for JSON)."""
    return {"forward_flops": spent.forward_flops, "backward_flops": spent.backward_flops, "flops": spent.flops,
            "tokens": spent.tokens, "backward_tokens": spent.backward_tokens, "by_source": dict(spent.by_source)}


class HeldOut(Callback):
    """Evaluates the held-out loss whenever the FLOPs spent cross a checkpoint, and at the end
    (the budget's meter paused: evaluations are not spending)."""

    def __init__(self, budget: ComputeBudget, target: Rows, checkpoints: Sequence[float],
                 on_point: Callable[[dict[str, float]], None] | None = None) -> None:
        self.budget, self.target = budget, target
        self.pending = sorted(c for c in checkpoints if c < budget.budget)
        self.points: list[dict[str, float]] = []
        self.on_point = on_point
        self.started = 0.0

    def record(self, trainer: pl.Trainer, module: BudgetLM) -> None:
        meter = self.budget.meter
        if meter is not None:
            meter.paused = True
        try:
            loss = heldout_loss(module.model, self.target)
        finally:
            if meter is not None:
                meter.paused = False
        spent = self.budget.spent
        point = {"flops": float(spent.flops), "forward_flops": float(spent.forward_flops), "backward_flops": float(spent.backward_flops),
                 "step": trainer.global_step, "heldout_loss": loss, "seconds": time.perf_counter() - self.started}
        self.points.append(point)
        if self.on_point is not None:
            self.on_point(point)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        while self.pending and self.budget.spent.flops >= self.pending[0]:
            self.pending.pop(0)
            self.record(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.points or self.points[-1]["step"] != trainer.global_step:
            self.record(trainer, pl_module)


# ---------------------------------------------------------------- one run
@dataclass
class Setup:
    """What a method contributes to a run (see ``benchmarks.equal_compute.methods``)."""

    loss_mode: str = "mean"
    callbacks: list[Callback] = field(default_factory=list)
    sampler: Any = None  # a weightwise EpochSampler, or None: a plain shuffle
    batch_sampler: Any = None  # a sampler of whole batches (MixtureBatchSampler); excludes ``sampler``
    scores: Scores | None = None  # per-row signals training_step returns (loss_mode "rows")
    batch_size: int | None = None  # rows per loader batch (default: the harness's)
    notes: dict[str, Any] = field(default_factory=dict)


def train(setup: Setup, *, model: LlamaForCausalLM, budget: ComputeBudget, pool: Rows, target: Rows, seed: int,
          batch_size: int, lr: float, warmup: float, final_lr: float, checkpoints: Sequence[float],
          max_steps: int, log: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train ``model`` on ``pool`` with a method's ``setup`` until ``budget`` (a fresh
    ``ComputeBudget(flops=...)``) is spent."""
    module = BudgetLM(model, budget, lr=lr, warmup=warmup, final_lr=final_lr, loss_mode=setup.loss_mode,
                      num_domains=len(pool.domains), scores=setup.scores)
    heldout = HeldOut(budget, target, checkpoints, log)
    dataset = IndexedDataset(RowDataset(pool))
    if setup.batch_sampler is not None:
        loader = DataLoader(dataset, batch_sampler=setup.batch_sampler)
    else:
        sampler = setup.sampler or RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        loader = DataLoader(dataset, batch_size=setup.batch_size or batch_size, sampler=sampler, drop_last=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, callbacks=[*setup.callbacks, budget, heldout],
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    if budget.spent.flops < budget.budget:
        raise RuntimeError(f"the run ended at {budget.spent.flops:.3g} of {budget.budget:.3g} FLOPs: raise max_steps ({max_steps})")
    return {"points": heldout.points, "spent": spent_dict(budget.spent), "steps": trainer.global_step, "fit_seconds": time.perf_counter() - start,
            "domain_rows": dict(zip(pool.domains, module.domain_rows.tolist(), strict=True)), **setup.notes}
