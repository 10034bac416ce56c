"""The one place where per-sample losses become the scalar that Lightning backpropagates.

docs/architecture.md, contract 3: a sample's final weight is the *product* of every weightwise
callback's factor (a sampler's unbiasing correction, a reweighting strategy's weight, ...),
computed, logged and applied here, once per step - no two callbacks each reduce the loss.

How it hooks in: Lightning's automatic optimisation backpropagates whatever ``training_step``
returns, and no callback hook sits between the two. So, for the duration of ``fit``, the reducer
wraps the module's ``training_step`` (:class:`weightwise.integrations.lightning.MethodPatch`; the
class is untouched and the original is restored at teardown). The wrapper reads the batch's sample
ids, gathers losses and ids from every data-parallel rank (so weights use global-batch statistics
and every rank's score store holds the same values), multiplies the callbacks' weights, records the
step in the score store and returns the weighted mean.

Under DDP each rank returns ``sum_local(w_i l_i) * R / B_global``; DDP averages gradients over the
R ranks, so the update is that of ``sum_global(w_i l_i) / B_global``: the same as one process
seeing the whole global batch, even when ranks hold different numbers of samples.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from weightwise.core import collectives
from weightwise.core.checkpoints import state_version, with_version
from weightwise.core.ids import sample_ids_from_batch
from weightwise.core.store import SampleScoreStore
from weightwise.integrations.lightning import MethodPatch, is_logging_step
from weightwise.reporting.histograms import log_histogram
from weightwise.weighting.losses import (
    TokenWeighting,
    check_per_sample_loss,
    document_ids_from_positions,
    reduce_token_losses,
    token_shares,
    weighted_mean,
)

NonFinitePolicy = Literal["raise", "drop"]


class WeightContributor(Protocol):
    """What the reducer needs of a callback that contributes a factor to the samples' weights
    (implemented by :class:`weightwise.weighting.callback.SampleWeightCallback`)."""

    nonfinite: NonFinitePolicy
    sample_id_key: str
    token_weighting: TokenWeighting
    needs_sample_ids: bool

    def sample_weights(self, losses: Tensor, sample_ids: Tensor | None, trainer: pl.Trainer) -> Tensor | None: ...


@dataclass
class StepOutput:
    """One ``training_step`` output, read: per-sample losses and what came with them."""

    losses: Tensor  # [S], with the graph
    tokens: Tensor | None = None  # [S] valid-token counts, when the step gave token losses or counts
    sample_ids: Tensor | None = None  # [S], when the step returned them
    scores: dict[str, Tensor] = field(default_factory=dict)  # named per-sample signals, [S] each
    extra: dict[str, Any] | None = None  # other keys of a dict output, passed on to Lightning
    packed: bool = False  # samples are documents of packed rows: the batch's row ids do not name them


_NO_SCORES: Mapping[str, Tensor] = {}
_KNOWN_KEYS = frozenset(("loss", "mask", "document_ids", "position_ids", "tokens", "sample_ids", "scores"))


def parse_step_output(output: Any) -> StepOutput:
    """Read a ``training_step`` output (see :meth:`PerSampleLossReducer.reduce` for the forms).

    Raises:
        MisconfigurationException: a dict without ``"loss"``.
        ValueError: token losses without a mask, or scores/token counts of another shape.
    """
    if not isinstance(output, Mapping):
        return StepOutput(check_per_sample_loss(output))
    if "loss" not in output:
        raise MisconfigurationException("training_step returned a dict without a 'loss' key")
    extra = {k: v for k, v in output.items() if k not in _KNOWN_KEYS}
    losses, tokens, packed = output["loss"], output.get("tokens"), False
    if isinstance(losses, Tensor) and losses.ndim == 2:
        mask = output.get("mask")
        if not isinstance(mask, Tensor):
            raise ValueError(
                f"training_step returned token losses {tuple(losses.shape)} without a 'mask': return"
                " {'loss': token_losses, 'mask': labels != -100} (weightwise.losses.token_cross_entropy gives both), so"
                " that padding and ignored tokens never count"
            )
        documents = output.get("document_ids")
        if documents is None and output.get("position_ids") is not None:
            documents = document_ids_from_positions(output["position_ids"])
        losses, tokens = reduce_token_losses(losses, mask, documents)
        packed = documents is not None
    losses = check_per_sample_loss(losses)
    if tokens is not None and (not isinstance(tokens, Tensor) or tokens.shape != losses.shape):
        raise ValueError(f"'tokens' must be a [B] tensor of token counts like the loss {tuple(losses.shape)}")
    scores: dict[str, Tensor] = {}
    if "scores" in output:
        given = output["scores"]
        if not isinstance(given, Mapping) or not all(isinstance(v, Tensor) and v.shape == losses.shape for v in given.values()):
            raise ValueError(
                "training_step's 'scores' must be a dict of per-sample tensors shaped like the per-sample loss"
                f" {tuple(losses.shape)}, e.g. {{'el2n': weightwise.losses.el2n(logits, y)}}"
            )
        scores = {name: v.detach().float().to(losses.device) for name, v in given.items()}
    sample_ids = output.get("sample_ids")
    return StepOutput(losses, tokens, sample_ids, scores, extra, packed and sample_ids is None)


def _require_one_id_per_loss(losses: Tensor, ids: Tensor | None) -> None:
    """Raise, naming the fix, unless there is one sample id per loss (the check runs in full only on a mismatch)."""
    if ids is not None and ids.numel() != losses.numel():
        check_per_sample_loss(losses, batch_size=int(ids.numel()))


_REDUCERS: weakref.WeakKeyDictionary[pl.LightningModule, PerSampleLossReducer] = weakref.WeakKeyDictionary()


class PerSampleLossReducer:
    """Reduces ``training_step``'s per-sample losses with the combined weight of all weightwise callbacks.

    Not constructed by users: the first :class:`~weightwise.weighting.callback.SampleWeightCallback`
    set up for a fit installs it (:meth:`install`), the others find it there.

    Attributes:
        scores: the per-sample :class:`~weightwise.core.store.SampleScoreStore`, written every step.
        nonfinite_dropped: samples dropped for a non-finite loss so far (``nonfinite="drop"``).
    """

    def __init__(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        contributors: Sequence[WeightContributor],
        nonfinite: NonFinitePolicy,
        sample_id_key: str,
        token_weighting: TokenWeighting = "rank",
        needs_sample_ids: bool = False,
    ) -> None:
        self.trainer = trainer
        self.module = pl_module
        self.contributors = contributors
        self.nonfinite = nonfinite
        self.sample_id_key = sample_id_key
        self.token_weighting: TokenWeighting = token_weighting
        self.needs_sample_ids = needs_sample_ids
        self.selectors = [c for c in contributors if callable(getattr(c, "select_batch", None))]
        self.scores = SampleScoreStore(fields=())  # the callbacks require the fields they read
        self.nonfinite_dropped = 0
        self._dropped_this_step = False
        self._patch: MethodPatch | None = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def install(
        cls, trainer: pl.Trainer, pl_module: pl.LightningModule, contributors: Sequence[WeightContributor]
    ) -> PerSampleLossReducer:
        """Return the module's reducer, creating it and wrapping ``training_step`` on first call.

        Raises:
            MisconfigurationException: manual optimisation, or contributors that disagree on
                ``nonfinite``, ``sample_id_key`` or ``token_weighting``.
        """
        existing = _REDUCERS.get(pl_module)
        if existing is not None:
            return existing
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "weightwise callbacks reduce the per-sample loss returned by training_step, which needs automatic"
                " optimization. With manual optimization, weight the losses yourself:"
                " weightwise.losses.weighted_mean(losses, weightwise.losses.loss_weights(losses, strategy))."
            )
        for option in ("nonfinite", "sample_id_key", "token_weighting"):
            values = {getattr(cb, option) for cb in contributors}
            if len(values) > 1:
                raise MisconfigurationException(
                    f"weightwise callbacks disagree on {option}={sorted(values)}; give them all the same value"
                )
        # Per-sample history (the score store) needs sample ids: a contributor or another callback
        # (SampleReport) that reads it says so; weights from the batch's own losses need none.
        needs_ids = any(getattr(cb, "needs_sample_ids", False) for cb in trainer.callbacks)
        first = contributors[0]
        reducer = cls(trainer, pl_module, contributors, first.nonfinite, first.sample_id_key, first.token_weighting, needs_ids)

        def make_training_step(original: Any) -> Any:
            def training_step(*args: Any, **kwargs: Any) -> Any:
                if args and not reducer.selectors:  # the usual step: the module's own, reduced
                    return reducer.reduce(original(*args, **kwargs), args[0])
                batch = args[0] if args else kwargs["batch"]
                rest, options = (args[1:], kwargs) if args else ((), {k: v for k, v in kwargs.items() if k != "batch"})
                for selector in reducer.selectors:  # online batch selection: the rows this step trains on
                    batch_idx = rest[0] if rest else options.get("batch_idx", 0)
                    batch = selector.select_batch(trainer, batch, batch_idx, lambda rows: original(rows, *rest, **options))
                return reducer.reduce(original(batch, *rest, **options), batch)

            return training_step

        reducer._patch = MethodPatch(pl_module, "training_step", make_training_step)
        _REDUCERS[pl_module] = reducer
        return reducer

    def uninstall(self) -> None:
        """Restore the module's own ``training_step``. Safe to call more than once."""
        if _REDUCERS.get(self.module) is self:
            del _REDUCERS[self.module]
        if self._patch is not None:
            self._patch.restore()
            self._patch = None

    # ------------------------------------------------------------------ the step
    def reduce(self, output: Any, batch: Any) -> Any:
        """Turn one ``training_step`` output into the same output with a scalar, weighted loss.

        Accepted outputs (docs/architecture.md, contract 1): per-sample losses ``[B]``; or a dict with
        ``"loss"`` (``[B]``, or token losses ``[B, T]`` with ``"mask"`` and optionally
        ``"document_ids"`` or ``"position_ids"`` for packed rows), optional ``"tokens"`` (``[B]`` token
        counts of per-sequence losses), ``"sample_ids"`` (the samples' ids when the batch does not
        carry them - for packed rows, one per document with a valid token, since the batch's ids name
        rows) and ``"scores"`` (named per-sample signals); other keys pass through to Lightning.

        Raises:
            MisconfigurationException: a dict without ``"loss"``.
            ValueError: losses of the wrong shape, token losses without a mask, sample ids missing
                where a callback keeps per-sample history - packed documents without their own
                ``"sample_ids"`` included (the message names the fix).
        """
        if output is None:  # Lightning's "skip this step"
            return None
        if isinstance(output, Tensor):  # per-sample losses [B], ids from the batch: the common step, kept short
            losses = check_per_sample_loss(output)
            ids = self._ids_from_batch(batch)
            _require_one_id_per_loss(losses, ids)
            return self._weighted_loss(losses, ids)
        step = parse_step_output(output)
        ids = step.sample_ids
        if ids is None:
            if not step.packed:
                ids = self._ids_from_batch(batch)
            elif self.needs_sample_ids:
                raise ValueError(self._packed_without_ids(step.losses.numel()))
        _require_one_id_per_loss(step.losses, ids)
        loss = self._weighted_loss(step.losses, ids, step.tokens, step.scores)
        return loss if step.extra is None else {"loss": loss, **step.extra}

    def _ids_from_batch(self, batch: Any) -> Tensor | None:
        try:
            return sample_ids_from_batch(batch, self.sample_id_key)
        except ValueError:
            if self.needs_sample_ids:
                raise
            return None  # a stream without ids: weights from the batch's own losses need none

    def _packed_without_ids(self, documents: int) -> str:
        needing = sorted({type(cb).__name__ for cb in self.trainer.callbacks if getattr(cb, "needs_sample_ids", False)})
        who = f"{', '.join(needing)} {'keeps' if len(needing) == 1 else 'keep'}" if needing else "a callback keeps"
        return (
            f"training_step returned the losses of {documents} packed documents (from 'document_ids' or 'position_ids'),"
            f" but {who} per-sample history by sample id, and a batch's sample ids name its rows, not the documents"
            " packed in them. Return each document's dataset index with the losses: {'loss': token_losses, 'mask': mask,"
            " 'position_ids': position_ids, 'sample_ids': ids}, one id per document that has a valid token, in row order"
            " then document order (the order of weightwise.losses.reduce_token_losses); or train without per-sample"
            " history (no store_fields, SampleReport or pruning sampler)."
        )

    def _weighted_loss(
        self, losses: Tensor, ids: Tensor | None, tokens: Tensor | None = None, scores: Mapping[str, Tensor] = _NO_SCORES
    ) -> Tensor:
        # The per-step path: every op here runs once per step for every rank, so only what this run
        # needs is gathered and computed (benchmarks/bookkeeping.py measures it against InfoBatch's).
        device = losses.device
        detached = losses.detach()
        if detached.dtype != torch.float32:
            detached = detached.float()
        if ids is not None and (ids.dtype != torch.long or ids.device != device):
            ids = ids.to(device, torch.long)
        if tokens is not None:
            tokens = tokens.to(device).float()
        world = collectives.world_size()
        if world == 1:  # one process: the gather is the identity
            global_losses, global_ids, global_tokens, global_ranks = detached, ids, tokens, None
            global_signals, local = list(scores.values()), slice(None)
        else:
            columns = [detached]
            if ids is not None:
                columns.append(ids)
            if tokens is not None:
                columns += [tokens, torch.full_like(detached, float(collectives.rank()))]
            columns += scores.values()
            gathered, local = collectives.all_gather_variable(*columns)
            global_losses, rest = gathered[0], iter(gathered[1:])
            global_ids = next(rest) if ids is not None else None
            global_tokens = next(rest) if tokens is not None else None
            global_ranks = next(rest) if tokens is not None else None
            global_signals = list(rest)

        # One reduction and one host read per step: the dot product (one kernel, the cheapest
        # reduction) is finite unless a loss is not, or it overflows - then _drop_nonfinite looks closer.
        if not math.isfinite(float(global_losses.dot(global_losses))):
            global_losses, global_ids, global_tokens, global_ranks, global_signals, losses, local = self._drop_nonfinite(
                global_losses, global_ids, global_tokens, global_ranks, global_signals, losses, local
            )
        if global_ids is not None:
            for name, values in zip(scores, global_signals):
                self.scores.record(name, global_ids, values)

        weights: Tensor | None = None
        for contributor in self.contributors:
            factor = contributor.sample_weights(global_losses, global_ids, self.trainer)
            if factor is not None:
                if factor.requires_grad:
                    factor = factor.detach()
                if factor.dtype != global_losses.dtype:
                    factor = factor.to(global_losses.dtype)
                weights = factor if weights is None else weights * factor
        if global_ids is not None:
            recorded = weights if weights is not None or "weight" not in self.scores.fields else torch.ones_like(global_losses)
            self.scores.update(global_ids, global_losses, self.trainer.global_step, weights=recorded)
        self._log(global_losses, weights)
        if global_tokens is not None:
            ranks = global_ranks if global_ranks is not None else torch.zeros_like(global_tokens)
            shares = token_shares(global_tokens, ranks, self.token_weighting, world)
            weights = shares if weights is None else weights * shares

        # Each rank's share of the global mean; DDP's gradient average over R ranks completes it.
        if world == 1:
            return losses.mean() if weights is None else weighted_mean(losses, weights)
        denominator = global_losses.numel() / world
        if weights is None:
            return losses.mean() if denominator == losses.numel() else losses.sum() / denominator
        return weighted_mean(losses, weights[local], denominator=denominator)

    def _drop_nonfinite(
        self,
        global_losses: Tensor,
        global_ids: Tensor | None,
        global_tokens: Tensor | None,
        global_ranks: Tensor | None,
        global_signals: list[Tensor],
        losses: Tensor,
        local: slice,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, list[Tensor], Tensor, slice]:
        """Raise for, or leave out, the samples whose loss is not finite (``nonfinite``)."""
        finite = torch.isfinite(global_losses)
        n_finite = int(finite.sum())
        if n_finite == global_losses.numel():  # the sum overflowed, every loss is finite
            return global_losses, global_ids, global_tokens, global_ranks, global_signals, losses, local
        where = global_ids[~finite] if global_ids is not None else (~finite).nonzero().squeeze(1)
        self._handle_nonfinite(where, n_finite, by_id=global_ids is not None)
        keep = lambda values: None if values is None else values[finite]  # noqa: E731
        local_finite = finite[local]
        if local.start is not None:  # several ranks: this rank's slice of the finite samples
            local = slice(int(finite[: local.start].sum()), int(finite[: local.stop].sum()))
        return (
            global_losses[finite],
            keep(global_ids),
            keep(global_tokens),
            keep(global_ranks),
            [values[finite] for values in global_signals],
            losses[local_finite],
            local,
        )

    def _handle_nonfinite(self, bad: Tensor, n_finite: int, *, by_id: bool) -> None:
        shown = f"sample ids {bad[:10].tolist()}" if by_id else f"positions in the global batch {bad[:10].tolist()}"
        if self.nonfinite == "raise" or n_finite == 0:
            reason = "every sample in the global batch" if n_finite == 0 else f"{bad.numel()} sample(s)"
            raise FloatingPointError(
                f"non-finite per-sample loss at step {self.trainer.global_step} for {reason}, {shown}."
                " Check those samples and the learning rate; to train on and skip such samples (counted and logged"
                " as weightwise/nonfinite_dropped), pass nonfinite='drop' to the weightwise callbacks."
            )
        self.nonfinite_dropped += bad.numel()
        self._dropped_this_step = True

    def check_gradients_after_drop(self) -> None:
        """After a step that dropped samples, make sure their NaN did not reach the gradients.

        Leaving a sample out of the loss gives its loss node a zero gradient, but when the NaN
        arose inside that sample's forward pass (say ``x * nan``), backpropagating zero through it
        still yields ``0 * nan = nan`` in the shared weights. Dropping cannot help then, so the
        step stops here rather than corrupting the model.
        """
        if not self._dropped_this_step:
            return
        self._dropped_this_step = False
        bad = [name for name, p in self.module.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        if bad:
            raise FloatingPointError(
                f"samples with a non-finite loss were dropped at step {self.trainer.global_step}, but the gradients are"
                f" non-finite anyway (e.g. {bad[:3]}): the NaN/inf arose inside those samples' forward pass, where"
                " dropping their loss cannot stop it. Fix the data or the computation that produces it."
            )

    def _log(self, global_losses: Tensor, weights: Tensor | None) -> None:
        # LightningModule.log costs ~1.5 ms a metric on a CPU - more than a small model's step - and
        # step-level values are only written every log_every_n_steps, so log only on those steps.
        if not is_logging_step(self.trainer):
            return
        if weights is None:
            weights = torch.ones_like(global_losses)
        metrics = {
            "weightwise/weight_min": weights.min(),
            "weightwise/weight_mean": weights.mean(),
            "weightwise/weight_max": weights.max(),
            "weightwise/loss_unweighted": global_losses.mean(),
        }
        if self.nonfinite == "drop":
            metrics["weightwise/nonfinite_dropped"] = torch.tensor(float(self.nonfinite_dropped))
        # Values are computed from the gathered global batch: identical on every rank, no sync needed.
        self.module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=global_losses.numel())
        log_histogram(self.trainer, "weightwise/weights", weights)

    # ------------------------------------------------------------------ checkpoints (docs/architecture.md, contract 4)
    STATE_VERSION = 1

    def state_dict(self) -> dict[str, Any]:
        return with_version({"scores": self.scores.state_dict(), "nonfinite_dropped": self.nonfinite_dropped}, self.STATE_VERSION)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state_version(state, "weightwise reducer", self.STATE_VERSION)
        self.scores.load_state_dict(state["scores"])
        self.nonfinite_dropped = int(state["nonfinite_dropped"])


def reducer_of(pl_module: pl.LightningModule) -> PerSampleLossReducer | None:
    """The reducer installed on a module for the current fit, if any."""
    return _REDUCERS.get(pl_module)
