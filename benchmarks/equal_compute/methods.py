"""The methods the harness compares, as configurations of weightwise callbacks and samplers.

A method is named on the command line as ``NAME[:key=value,...]``, and methods combine with
``+`` (``dsir+linupper:r=1``): the callbacks add up, at most one sampler. Every knob below is a
named parameter; the defaults are the references' unless a reason is given.

* ``plain``: the mean over the batch's target bytes, uniform shuffle of the pool.
* ``linupper`` / ``quadratic`` / ``extremes``: ``LossReweighting`` (Sow et al., ICLR 2025; code
  ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025``) with ``r`` (their temperature, 0.4) and
  ``warmup`` - a fraction of the steps plain training takes at this budget (the reference's 1000
  steps would be the whole run here; default 0.1). The sample is the row.
* ``select``: ``OnlineBatchSelection`` at Composer's ``SelectiveBackprop`` defaults (keep 0.5,
  active from 0.5 to 0.9 of the run, every 2nd batch whole, loss-rank sampling); the window is a
  fraction of the *compute budget* spent (a budgeted run has no step count fixed in advance).
* ``rho``: RHO-LOSS (Mindermann et al., ICML 2022; ``OATML/RHO-Loss``): the rows with the
  highest training loss minus the reference model's loss on them. The reference losses are
  computed once per run over the pool at its first step (as the paper precomputes irreducible
  losses; counted as ``reference_model`` FLOPs); the reference model trains on the clean held-in set. ``keep=0.25`` of a
  batch of ``batch/keep`` rows, so the backward batch equals plain's; the paper's 0.1 (32 of 320)
  costs 4.3x plain's FLOPs per step here, 0.25 costs 2.3x (``keep=0.1`` runs it).
* ``perplexity``: ``PerplexityBandSampler`` (Ankner et al., 2024) with a ``DataPruning`` scoring
  pass by the same reference model; ``band`` (``high``, the paper's best on the Pile;
  ``medium``) and ``keep`` (0.5).
* ``dsir``: ``DSIRSampler.from_texts`` (Xie et al., NeurIPS 2023; ``p-lambda/dsir``) toward the
  clean held-in set (never the evaluation target), ``fraction=0.5``; rows are short, so
  ``min_length=0``.
* ``infobatch``: ``InfoBatchSampler`` (Qin et al., ICLR 2024), ``prune=0.5``, its epoch count the
  number of full passes plain training makes at this budget (at least 3: with fewer, annealing at
  0.875 of the epochs leaves no pruned epoch after the first, unscored one).
* ``dft``: ``TokenWeighting("dft")`` (Wu et al. 2025, ``yongliang-wu/DFT``): each byte's loss times
  its detached probability.
* ``rho1``: ``SelectiveTokens`` (Lin et al., NeurIPS 2024, ``microsoft/rho``) with the same
  reference model as ``rho``, ``keep=0.6`` (the paper's): the top 60% of the batch's bytes by
  excess loss over the reference; the reference's forward of every batch counts as ``reference_model``.
* ``mix:POLICY``: ``DomainMixing`` over a ``MixtureBatchSampler`` (batches drawn by the current
  domain weights; ``exhausted="restart"``); the domains are the pool's folders (``Rows.domain_of_row``;
  no policy reads their names). ``natural`` / ``uniform`` (``FixedMixture``); ``odm`` (Albalak et
  al. 2023) from the natural mixture, ``smoothing=0.5``, ``warmup`` a fraction of plain's steps
  (default 0.1: the paper's 2000 steps would be the whole run); ``doremi`` (Xie et al., NeurIPS
  2023) from the uniform mixture, ``eta=1``, ``smoothing=1e-3``, excess loss over the same reference
  model (trained on the clean held-in set, not on the natural mixture as DoReMi's is: it measures
  distance from clean text), its forward counted as ``reference_model``; ``ado`` (Jiang et al.,
  ICLR 2025) with its 1000-step waits given as fractions of plain's steps (``ignore=0.1,
  start=0.3, every=0.1``) and ``window=11`` (the reference's 101 is the whole run here). Each run
  records the weights after every step (``domain_weights``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from benchmarks.equal_compute.harness import Rows, Setup
from weightwise.callbacks import (
    ComputeBudget,
    DataPruning,
    DomainMixing,
    LossReweighting,
    OnlineBatchSelection,
    SelectiveTokens,
    TokenWeighting,
)
from weightwise.mixing import ADO, ODM, DoReMi, FixedMixture, MixingPolicy, MixtureBatchSampler, excess_loss
from weightwise.samplers import DSIRSampler, InfoBatchSampler, PerplexityBandSampler, sequence_perplexity
from weightwise.weighting.tokens import ReferenceLosses

Params = dict[str, float | str]


@dataclass
class Context:
    """What a method may read to build itself for one run."""

    pool: Rows
    reference: Rows | None
    seed: int
    budget: ComputeBudget  # this run's budget (counts every pass; ``fraction`` is the share spent)
    seq_len: int
    batch_size: int
    plain_steps: int  # optimizer steps plain training takes at this run's budget
    reference_model: Callable[[], torch.nn.Module]  # trained on the reference set on first use, then cached

    def need_reference(self, method: str) -> Rows:
        if self.reference is None:
            raise ValueError(f"method {method!r} needs clean held-in text: pass --reference DIR (same layout as --corpus)")
        return self.reference


class BudgetWindowSelection(OnlineBatchSelection):
    """``OnlineBatchSelection`` whose ``start``/``end`` window is a fraction of the FLOP budget spent."""

    def __init__(self, budget: ComputeBudget, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.budget = budget

    def active(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        in_window = self.start <= self.budget.fraction < self.end
        return in_window and (self.interrupt == 0 or (batch_idx + 1) % self.interrupt != 0)


def reweighting(strategy: str) -> Callable[..., Setup]:
    def build(ctx: Context, r: float = 0.4, warmup: float = 0.1) -> Setup:
        steps = round(float(warmup) * ctx.plain_steps)
        return Setup(loss_mode="rows", callbacks=[LossReweighting(strategy, temperature=float(r), warmup_steps=steps)],
                     notes={"warmup_steps": steps})
    return build


def plain(ctx: Context) -> Setup:
    return Setup()


def select(ctx: Context, keep: float = 0.5, start: float = 0.5, end: float = 0.9, interrupt: int = 2) -> Setup:
    callback = BudgetWindowSelection(ctx.budget, keep=float(keep), start=float(start), end=float(end), interrupt=int(interrupt), seed=ctx.seed)
    return Setup(loss_mode="rows", callbacks=[callback])


def reference_model(ctx: Context, method: str) -> torch.nn.Module:
    """The reference model in eval mode (a module outside the trained one: ComputeBudget counts its
    forwards during the fit as ``reference_model``)."""
    ctx.need_reference(method)
    return ctx.reference_model().eval()


@torch.no_grad()
def row_losses(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``[B]`` mean next-byte NLL of each row under ``model`` (its documents kept apart)."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return sequence_perplexity(logits, batch["labels"]).log()


def rho(ctx: Context, keep: float = 0.25) -> Setup:
    model = reference_model(ctx, "rho")
    table: list[Tensor] = []

    def irreducible(batch: dict[str, Tensor]) -> Tensor:
        if not table:  # the whole pool, once, at the first step (inside the fit: counted)
            losses = []
            for start in range(0, len(ctx.pool.rows), 64):
                rows = ctx.pool.rows[start : start + 64]
                losses.append(row_losses(model, {key: torch.stack([r[key] for r in rows]) for key in ("input_ids", "position_ids", "labels")}))
            table.append(torch.cat(losses))
        return table[0][batch["sample_id"].cpu()]

    callback = OnlineBatchSelection(keep=float(keep), method="top", start=0.0, end=1.0, interrupt=0, seed=ctx.seed,
                                    reference_loss=irreducible)
    return Setup(loss_mode="rows", callbacks=[callback], batch_size=round(ctx.batch_size / float(keep)))


def perplexity(ctx: Context, band: str = "high", keep: float = 0.5) -> Setup:
    model = reference_model(ctx, "perplexity")
    sampler = PerplexityBandSampler(len(ctx.pool.rows), float(keep), band=str(band), seed=ctx.seed)  # type: ignore[arg-type]
    score = lambda module, batch: {"perplexity": row_losses(model, batch).exp()}  # noqa: E731
    return Setup(loss_mode="rows", callbacks=[DataPruning(score_fn=score)], sampler=sampler)


def dsir(ctx: Context, fraction: float = 0.5) -> Setup:
    reference = ctx.need_reference("dsir")
    sampler = DSIRSampler.from_texts(ctx.pool.texts(), reference.texts(), float(fraction), min_length=0, seed=ctx.seed)
    return Setup(loss_mode="rows", callbacks=[DataPruning()], sampler=sampler)


def infobatch(ctx: Context, prune: float = 0.5) -> Setup:
    epochs = max(3, round(ctx.plain_steps * ctx.batch_size / len(ctx.pool.rows)))
    sampler = InfoBatchSampler(len(ctx.pool.rows), float(prune), num_epochs=epochs, seed=ctx.seed)
    return Setup(loss_mode="rows", callbacks=[DataPruning()], sampler=sampler, notes={"infobatch_epochs": epochs})


def dft(ctx: Context) -> Setup:
    return Setup(loss_mode="rows", callbacks=[TokenWeighting("dft")])


def rho1(ctx: Context, keep: float = 0.6) -> Setup:
    return Setup(loss_mode="rows", callbacks=[SelectiveTokens(reference_model(ctx, "rho1"), keep=float(keep))])


class WeightTrajectory(pl.Callback):
    """Appends ``{"step", "flops", "weights"}`` to ``trajectory`` after every optimizer step: the
    mixture ``mixing`` draws by from then on (for the weight plots)."""

    def __init__(self, mixing: DomainMixing, budget: ComputeBudget, trajectory: list[dict[str, Any]]) -> None:
        self.mixing, self.budget, self.trajectory = mixing, budget, trajectory

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.trajectory.append({"step": trainer.global_step, "flops": float(self.budget.spent.flops),
                                "weights": self.mixing.weights.tolist()})


def mix(ctx: Context, policy: str = "odm", warmup: float = 0.1, ignore: float = 0.1, start: float = 0.3,
        every: float = 0.1, window: float = 11) -> Setup:
    pool = ctx.pool
    sampler = MixtureBatchSampler(pool.domain_of_row, ctx.batch_size, num_domains=len(pool.domains), names=pool.domains,
                                  seed=ctx.seed, num_replicas=1, rank=0)
    k, steps = len(pool.domains), ctx.plain_steps
    scores = None
    chosen: MixingPolicy
    if policy == "natural":
        chosen = FixedMixture.natural(sampler.sizes)
    elif policy == "uniform":
        chosen = FixedMixture.uniform(k)
    elif policy == "odm":
        chosen = ODM(k, sampler.sizes, warmup_steps=round(float(warmup) * steps))
    elif policy == "ado":
        chosen = ADO(k, sampler.sizes, ignore_steps=round(float(ignore) * steps), start_step=round(float(start) * steps),
                     update_every=max(1, round(float(every) * steps)), window=int(window))
    elif policy == "doremi":
        chosen = DoReMi(k)
        scorer = ReferenceLosses(reference_model(ctx, "mix:doremi"))  # a module outside the trained one: counted

        def scores(batch: dict[str, Tensor], tokens: Tensor, mask: Tensor) -> dict[str, Tensor]:
            with torch.no_grad():
                reference, _ = scorer(batch)
            return {"excess_loss": excess_loss(tokens, reference, mask)}
    else:
        raise ValueError(f"mix policy must be natural, uniform, odm, ado or doremi, got {policy!r}")
    mixing = DomainMixing(chosen, sampler)
    trajectory: list[dict[str, Any]] = []
    return Setup(loss_mode="rows", callbacks=[mixing, WeightTrajectory(mixing, ctx.budget, trajectory)], batch_sampler=sampler,
                 scores=scores, notes={"domain_weights": trajectory, "domain_names": list(pool.domains)})


METHODS: dict[str, Callable[..., Setup]] = {
    "plain": plain, "linupper": reweighting("linupper"), "quadratic": reweighting("quadratic"),
    "extremes": reweighting("extremes"), "select": select, "rho": rho, "perplexity": perplexity, "dsir": dsir,
    "infobatch": infobatch, "dft": dft, "rho1": rho1, "mix": mix,
}
POSITIONAL = {"mix": "policy"}
"""Methods whose first parameter may be given bare: ``mix:odm`` = ``mix:policy=odm``."""


def parse(spec: str) -> list[tuple[str, Params]]:
    """``"dsir+linupper:r=1,warmup=0.2"`` -> ``[("dsir", {}), ("linupper", {"r": 1.0, "warmup": 0.2})]``;
    ``"mix:odm"`` -> ``[("mix", {"policy": "odm"})]`` (see ``POSITIONAL``).

    Raises:
        ValueError: an unknown method name or a malformed parameter.
    """
    parts = []
    for piece in spec.split("+"):
        name, _, rest = piece.partition(":")
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r} in {spec!r}; choose from {sorted(METHODS)}")
        params: Params = {}
        for position, item in enumerate(filter(None, rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq and position == 0 and name in POSITIONAL:
                key, eq, value = POSITIONAL[name], "=", item
            if not eq:
                raise ValueError(f"parameter {item!r} of {spec!r} must be key=value")
            try:
                params[key] = float(value)
            except ValueError:
                params[key] = value
        parts.append((name, params))
    return parts


def build(spec: str, ctx: Context) -> Setup:
    """The merged :class:`Setup` of a (possibly combined) method spec.

    Raises:
        ValueError: see :func:`parse`; two samplers, two batch sizes or two score functions in one
            combination; an unknown parameter.
    """
    merged = Setup()
    for name, params in parse(spec):
        try:
            part = METHODS[name](ctx, **params)
        except TypeError as error:
            raise ValueError(f"bad parameters for {name!r} in {spec!r}: {error}") from error
        samplers = [x for x in (merged.sampler, merged.batch_sampler, part.sampler, part.batch_sampler) if x is not None]
        if len(samplers) > 1:
            raise ValueError(f"{spec!r} combines two samplers; a combination may hold one")
        if part.batch_size is not None and merged.batch_size is not None:
            raise ValueError(f"{spec!r} combines two batch sizes")
        if part.scores is not None and merged.scores is not None:
            raise ValueError(f"{spec!r} combines two score functions")
        merged = Setup(
            loss_mode="rows" if "rows" in (merged.loss_mode, part.loss_mode) else "mean",
            callbacks=merged.callbacks + part.callbacks, sampler=merged.sampler or part.sampler,
            batch_sampler=merged.batch_sampler or part.batch_sampler, scores=merged.scores or part.scores,
            batch_size=merged.batch_size or part.batch_size,
            notes={**merged.notes, **part.notes},
        )
    return merged
