"""Every callback and sampler as one contract case: a tiny real run, and the decisions it took.

Two contracts are checked over the same cases (docs/architecture.md, contracts 4 and 5):

* ``tests/test_contracts.py``: a run resumed from a checkpoint written mid-run equals the
  uninterrupted run - the same parameters and the same decisions;
* ``tests/distributed``: under 2-process DDP and ZeRO, with data that differs per rank, rank 0 and
  rank 1 take the same decisions.

A case builds its module, its loader and its callbacks; :meth:`Case.decisions` reads what the
callbacks decided (plans, layer sets, copy counts, weights, report rows) after a fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from tests.support.models import Classifier, TinyLlama, TinyMoELM, TokenLossLM, blobs, indexed_loader
from weightwise import IndexedDataset
from weightwise.callbacks import (
    DataPruning,
    ExpertUpcycling,
    LayerwiseSampling,
    LossReweighting,
    OnlineBatchSelection,
    SampleReport,
)
from weightwise.samplers import (
    CoverageSampler,
    DSIRSampler,
    ImportanceSampler,
    InfoBatchSampler,
    PerplexityBandSampler,
    RandomSubsetSampler,
    ScorePruningSampler,
    reference_perplexity,
)


class Decisions(pl.Callback):
    """Records, for every step, what the weightwise callbacks of the run had decided at its start."""

    def __init__(self) -> None:
        self.plans: dict[int, list[int]] = {}
        self.layers: list[list[int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, DataPruning) and callback.sampler is not None:
                self.plans[trainer.current_epoch] = callback.sampler.plan.indices.tolist()
            if isinstance(callback, LayerwiseSampling):
                self.layers.append(list(callback.active))


def easy_and_random(n: int, length: int, vocab: int, rank_offset: int = 0) -> list[dict]:
    """Alternating easy (one token repeated) and random sequences: with Lightning's
    DistributedSampler (no shuffle) rank 0 trains the easy and rank 1 the random ones."""
    generator = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        tokens = torch.full((length,), (i + rank_offset) % vocab) if i % 2 == 0 else torch.randint(0, vocab, (length,), generator=generator)
        items.append({"input_ids": tokens, "labels": tokens})
    return items


def token_loader(n: int = 16, length: int = 12, vocab: int = 64, batch_size: int = 2) -> DataLoader:
    return DataLoader(easy_and_random(n, length, vocab), batch_size=batch_size)


def moe_loader(n: int = 24, length: int = 16, batch_size: int = 2) -> DataLoader:
    return DataLoader(easy_and_random(n, length, 97), batch_size=batch_size)


@dataclass
class Case:
    """One callback (or sampler) configuration, runnable on one process and on two.

    Attributes:
        name: the case's id.
        module: builds the LightningModule (seeded by the caller).
        loader: builds the training loader.
        callbacks: builds the weightwise callbacks under test.
        epochs: epochs of the uninterrupted run.
        checkpoint: where the interrupted run saves and stops: after this many epochs, or - with
            ``mid_epoch`` (pruning samplers, which resume mid-epoch exactly) - this many steps.
        mid_epoch: whether ``checkpoint`` counts steps.
        trainer_kwargs: extra ``Trainer`` arguments.
        self_sharding: the loader's sampler shards itself (``use_distributed_sampler=False``).
        zero: whether the case runs under DeepSpeed ZeRO (ExpertUpcycling refuses it).
    """

    name: str
    module: Callable[[], pl.LightningModule]
    loader: Callable[[], DataLoader]
    callbacks: Callable[[], list[pl.Callback]]
    epochs: int = 3
    checkpoint: int = 1
    mid_epoch: bool = False
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    self_sharding: bool = False
    zero: bool = True

    def decisions(self, callbacks: list[pl.Callback], recorder: Decisions) -> dict[str, Any]:
        """What the callbacks decided, as plain tensors and lists (comparable across runs and ranks)."""
        out: dict[str, Any] = {}
        for callback in callbacks:
            if isinstance(callback, LossReweighting):
                store = callback.reducer.scores
                out["weights"] = store.weight.clone() if len(store) else None
            if isinstance(callback, DataPruning):
                out["plans"] = dict(recorder.plans)
                out["ledger"] = {k: v for k, v in callback.ledger.items() if not k.endswith("seconds")}
                out["epoch_weights"] = callback.sampler.epoch_weights()
            if isinstance(callback, LayerwiseSampling):
                out["layers"] = list(recorder.layers)
                out["importance"] = None if callback.importance is None else callback.importance.clone()
            if isinstance(callback, ExpertUpcycling):
                out["copies"] = None if callback.report is None else {k: v.clone() for k, v in callback.report.copies.items()}
            if isinstance(callback, OnlineBatchSelection):
                out["online"] = dict(callback.ledger)
            if isinstance(callback, SampleReport):
                out["report"] = [row[:2] + [round(float(v), 5) for v in row[2:4]] + row[4:] for row in callback.rows]
        return out


def reference_lm() -> torch.nn.Module:
    """A 1-layer Llama as the perplexity reference model (its own seed; the global RNG is left alone)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(1)
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        return LlamaForCausalLM(config)


def indexed_token_loader(sampler: Any, n: int = 24, length: int = 12, batch_size: int = 2) -> DataLoader:
    return DataLoader(IndexedDataset(easy_and_random(n, length, 64)), batch_size=batch_size, sampler=sampler)


def pruning(sampler: Callable[[], Any], **module_kwargs: Any) -> dict[str, Any]:
    return dict(
        module=lambda: Classifier(el2n=True, optimizer="adamw", lr=0.05, **module_kwargs),
        loader=lambda: indexed_loader(48, 6, sampler=sampler()),
        self_sharding=True,
    )


DSIR_TARGET = ["shares in the firm rose after quarterly profits beat forecasts", "analysts said profits and sales rose"]
"""The target texts of the DSIR cases: business news."""

DSIR_TOPICS = (
    ["shares", "profits", "forecasts", "analysts", "sales", "the firm", "quarterly", "rose", "fell", "said"],
    ["def", "return", "sorted", "argv", "import", "self", "None", "lambda", "(", "):"],
    ["the", "match", "goal", "season", "coach", "striker", "won", "league", "fans", "after"],
)
"""Words of the DSIR cases' corpus, one list per class of :func:`tests.support.models.blobs`."""


def dsir_texts(n: int = 48) -> list[str]:
    """A text per sample of ``blobs(n)``, from its class' words (class 0: news-like, 1: code, 2: sport);
    each sample picks its own words, so that the importance weights differ within a class too."""
    labels = blobs(n).tensors[1].tolist()
    generator = torch.Generator().manual_seed(0)
    texts = []
    for label in labels:
        words = DSIR_TOPICS[label]
        picks = torch.randint(0, len(words), (int(torch.randint(4, 12, (1,), generator=generator)),), generator=generator)
        texts.append(" ".join(words[i] for i in picks.tolist()))
    return texts


def dsir(mode: str, **options: Any) -> DSIRSampler:
    """DSIR over :func:`dsir_texts` toward :data:`DSIR_TARGET` (short texts: no length filter)."""
    return DSIRSampler.from_texts(dsir_texts(), DSIR_TARGET, mode=mode, min_length=0, **options)


CASES: list[Case] = [
    Case(
        "reweighting",
        module=lambda: Classifier(optimizer="adamw", lr=0.05),
        loader=lambda: indexed_loader(48, 6),
        callbacks=lambda: [LossReweighting("linupper", warmup_steps=2), SampleReport(k=3)],
    ),
    Case(
        "online",
        module=lambda: Classifier(optimizer="adamw", lr=0.05),
        loader=lambda: indexed_loader(48, 8),
        callbacks=lambda: [OnlineBatchSelection(keep=0.5, start=0.0, end=1.0, interrupt=3)],
    ),
    Case(
        "reweighting_window",
        module=lambda: Classifier(optimizer="adamw", lr=0.05),
        loader=lambda: indexed_loader(48, 2),
        callbacks=lambda: [LossReweighting("quadratic", warmup_steps=0, statistic="window", window=8)],
        epochs=2,
    ),
    Case(
        "infobatch",
        callbacks=lambda: [DataPruning()],
        **pruning(lambda: InfoBatchSampler(48, prune_ratio=0.5)),
        epochs=4,
        checkpoint=10,
        mid_epoch=True,
    ),
    Case("rs2", callbacks=lambda: [DataPruning()], **pruning(lambda: RandomSubsetSampler(48, 0.5)), epochs=4, checkpoint=6, mid_epoch=True),
    Case(
        "importance",
        callbacks=lambda: [DataPruning()],
        **pruning(lambda: ImportanceSampler(48, 0.5)),
        epochs=4,
        checkpoint=6,
        mid_epoch=True,
    ),
    Case(
        "data_diet",
        callbacks=lambda: [DataPruning()],
        **pruning(lambda: ScorePruningSampler(48, 0.5, warmup_epochs=1, rescore_every=2, averaging="ema")),
        epochs=5,
        checkpoint=10,
        mid_epoch=True,
    ),
    Case(
        "ccs",
        callbacks=lambda: [DataPruning()],
        **pruning(lambda: CoverageSampler(48, 0.5, warmup_epochs=1, rescore_every=2, skip_hardest=0.1, strata=5)),
        epochs=5,
        checkpoint=10,
        mid_epoch=True,
    ),
    Case(
        "perplexity",
        module=lambda: TokenLossLM("tokens", layers=2),
        loader=lambda: indexed_token_loader(PerplexityBandSampler(24, 0.5, band="medium")),
        callbacks=lambda: [DataPruning(score_fn=reference_perplexity(reference_lm()))],
        self_sharding=True,
        epochs=3,
        checkpoint=8,
        mid_epoch=True,
    ),
    Case(
        "dsir_resample",
        callbacks=lambda: [DataPruning()],
        **pruning(lambda: dsir("resample", fraction=0.5)),
        epochs=3,
        checkpoint=6,  # one process: 24 samples an epoch, 4 steps; stops mid-epoch 1
        mid_epoch=True,
    ),
    Case(
        "dsir_weight",
        callbacks=lambda: [DataPruning()],
        **pruning(lambda: dsir("weight", max_weight=3.0)),
        epochs=2,
        checkpoint=10,  # one process: 48 weighted samples an epoch, 8 steps; stops mid-epoch 1
        mid_epoch=True,
    ),
    Case(
        "lisa",
        module=lambda: TinyLlama(layers=4),
        loader=token_loader,
        callbacks=lambda: [LayerwiseSampling("lisa", n_layers=2, interval=3)],
    ),
    Case(
        "ist",
        module=lambda: TinyLlama(layers=4),
        loader=token_loader,
        callbacks=lambda: [LayerwiseSampling("ist", n_layers=2, probe_every=3, optimizer_state="release")],
    ),
    Case(
        "badam",
        module=lambda: TinyLlama(layers=4),
        loader=token_loader,
        callbacks=lambda: [LayerwiseSampling("badam", interval=2, order="random")],
    ),
    Case(
        "loss_credit",
        module=lambda: TinyLlama(layers=4),
        loader=token_loader,
        callbacks=lambda: [LayerwiseSampling("loss_credit", n_layers=2, interval=2)],
    ),
    Case(
        "block_influence",
        module=lambda: TinyLlama(layers=4),
        loader=token_loader,
        callbacks=lambda: [LayerwiseSampling("block_influence", n_layers=2, interval=2, refresh_every=2)],
    ),
    Case(
        "upcycling",
        module=lambda: TinyMoELM(top_k=2),
        loader=moe_loader,
        callbacks=lambda: [ExpertUpcycling(at_step=8, selection="utility", utility_window=4)],  # window: steps 4-7
        epochs=4,  # 6 steps an epoch on one process, 3 on each of two
        trainer_kwargs={"accumulate_grad_batches": 2},
        zero=False,
    ),
]
"""The cases; every public callback and sampler appears in at least one."""

CASES_BY_NAME = {case.name: case for case in CASES}


def fit_case(
    case: Case,
    root: Any,
    *,
    interrupted: bool = False,
    resume_from: Any = None,
    **overrides: Any,
) -> tuple[pl.LightningModule, list[pl.Callback], Decisions, pl.Trainer]:
    """Fit ``case`` (seeded): uninterrupted, ``interrupted`` (save ``root/last.ckpt`` at the case's
    checkpoint and stop) or resumed from ``resume_from``. ``overrides`` go to the ``Trainer``
    (``devices``, ``strategy``)."""
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.support.training import trainer

    seed_everything(0)
    module, callbacks, recorder = case.module(), case.callbacks(), Decisions()
    extra: list[pl.Callback] = [recorder]
    kwargs: dict[str, Any] = {"max_epochs": case.epochs, **case.trainer_kwargs}
    if interrupted:
        if case.mid_epoch:
            kwargs["max_steps"] = case.checkpoint
            extra.append(ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1))
        else:
            kwargs["max_epochs"] = case.checkpoint
            extra.append(ModelCheckpoint(dirpath=root, save_last=True))
    if case.self_sharding:
        kwargs["use_distributed_sampler"] = False
    fit = trainer(callbacks=[*callbacks, *extra], enable_checkpointing=interrupted, default_root_dir=root, **{**kwargs, **overrides})
    fit.fit(module, case.loader(), ckpt_path=resume_from)
    return module, callbacks, recorder, fit
