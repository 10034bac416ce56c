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
    reduce_weighted_token_losses,
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


class TokenWeightContributor(Protocol):
    """A contributor that also weights tokens (implemented by
    :class:`weightwise.weighting.token_callback.TokenWeightCallback`)."""

    def token_weights(self, token_losses: Tensor, mask: Tensor, batch: Any, trainer: pl.Trainer) -> Tensor | None: ...

    def account_tokens(self, valid: int, selected: int) -> None: ...


@dataclass
class TokenLosses:
    """The token losses a step returned, before they are reduced per sample."""

    losses: Tensor  # [B, T], with the graph
    mask: Tensor  # [B, T] bool
    document_ids: Tensor | None  # [B, T] for packed rows


@dataclass
class StepOutput:
    """One ``training_step`` output, read: per-sample losses and what came with them."""

    losses: Tensor  # [S], with the graph
    tokens: Tensor | None = None  # [S] valid-token counts, when the step gave token losses or counts
    sample_ids: Tensor | None = None  # [S], when the step returned them
    scores: dict[str, Tensor] = field(default_factory=dict)  # named per-sample signals, [S] each
    extra: dict[str, Any] | None = None  # other keys of a dict output, passed on to Lightning
    packed: bool = False  # samples are documents of packed rows: the batch's row ids do not name them
    domain_ids: Tensor | None = None  # [S], when the step returned them (packed documents' domains)
    token_losses: TokenLosses | None = None  # when the step returned token losses [B, T]


_NO_SCORES: Mapping[str, Tensor] = {}
_KNOWN_KEYS = frozenset(("loss", "mask", "document_ids", "position_ids", "tokens", "sample_ids", "scores", "domain_ids"))


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
    losses, tokens, packed, token_losses = output["loss"], output.get("tokens"), False, None
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
        token_losses = TokenLosses(losses, mask.bool(), documents)
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
    return StepOutput(losses, tokens, sample_ids, scores, extra, packed and sample_ids is None, output.get("domain_ids"), token_losses)


@dataclass
class StepView:
    """The current step's global-batch columns beside the losses (every rank's, in rank order, after
    non-finite samples were dropped), set before the contributors are asked for their factors."""

    tokens: Tensor | None = None  # [B_global] valid-token counts, when the step gave token losses or counts
    domain_ids: Tensor | None = None  # [B_global], when a contributor reads domains (``domain_key``)
    scores: dict[str, Tensor] = field(default_factory=dict)  # the named per-sample signals, gathered


def step_domain_ids(given: Any, batch: Any, key: str, n_losses: int) -> Tensor:
    """The ``[S]`` domain ids of a step's samples: those ``training_step`` returned (``"domain_ids"``),
    else those the batch carries under ``key`` (read like sample ids).

    Raises:
        ValueError: no integer ids, or not one per loss (packed documents: return ``"domain_ids"``
            from ``training_step``, one per document).
    """
    domains = given
    if domains is None:
        try:
            domains = sample_ids_from_batch(batch, key)
        except ValueError:
            domains = None
    if not isinstance(domains, Tensor) or domains.dtype.is_floating_point or domains.numel() != n_losses:
        found = "none" if not isinstance(domains, Tensor) else f"{domains.numel()} ({domains.dtype})"
        raise ValueError(
            f"a domain-mixing callback needs one domain id per sample: the batch carries {found} under {key!r} for"
            f" {n_losses} per-sample losses. Load the data through weightwise.mixing.MixingStream (it adds the id to"
            " every item), or return {'loss': losses, 'domain_ids': ids} from"
            " training_step - for packed documents one id per document, in the order of the losses"
            " (weightwise.mixing.document_domains expands each row's domain to its documents)."
        )
    return domains


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
        self.token_contributors: list[TokenWeightContributor] = [
            c for c in contributors if callable(getattr(c, "token_weights", None))  # type: ignore[misc]
        ]
        # A contributor that reads each sample's domain (weightwise.mixing) names the batch key that carries it.
        self.domain_key: str | None = next((c.domain_key for c in contributors if getattr(c, "domain_key", None)), None)
        self.step = StepView()  # this step's global-batch columns, for contributors that need more than the losses
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
                by_callback = ", ".join(f"{type(cb).__name__}: {getattr(cb, option)!r}" for cb in contributors)
                raise MisconfigurationException(
                    f"weightwise callbacks disagree on {option} ({by_callback}); give them all the same value"
                    + (" - token callbacks default to 'global'" if option == "token_weighting" else "")
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
        # The common step, kept short: per-sample losses [B], ids from the batch (domains take the dict path).
        if isinstance(output, Tensor) and self.domain_key is None and not self.token_contributors:
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
        domains = None
        if self.domain_key is not None:
            domains = step_domain_ids(step.domain_ids, batch, self.domain_key, step.losses.numel())
        objective = self._token_objective(step, batch) if self.token_contributors else None
        loss = self._weighted_loss(step.losses, ids, step.tokens, step.scores, domains, objective)
        return loss if step.extra is None else {"loss": loss, **step.extra}

    def _token_objective(self, step: StepOutput, batch: Any) -> tuple[Tensor, Tensor]:
        """The token contributors' factors, multiplied per token and reduced per sample
        (:func:`~weightwise.weighting.losses.reduce_weighted_token_losses`): the losses to backpropagate
        and each sample's count of selected tokens."""
        if step.token_losses is None:
            names = sorted({type(c).__name__ for c in self.token_contributors})
            raise ValueError(
                f"{', '.join(names)} weight tokens, but training_step returned per-sample losses: return the token losses"
                " and their mask, {'loss': token_losses, 'mask': mask} (weightwise.losses.token_cross_entropy(logits,"
                " labels, shift=True) gives both)"
            )
        token_losses, mask, documents = step.token_losses.losses, step.token_losses.mask, step.token_losses.document_ids
        detached = token_losses.detach().float()
        weights: Tensor | None = None
        for contributor in self.token_contributors:
            factor = contributor.token_weights(detached, mask, batch, self.trainer)
            if factor is not None:
                factor = factor.detach().float()
                weights = factor if weights is None else weights * factor
        if weights is None:
            weights = torch.ones_like(detached)
        return reduce_weighted_token_losses(token_losses, mask, weights, documents)

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
        self,
        losses: Tensor,
        ids: Tensor | None,
        tokens: Tensor | None = None,
        scores: Mapping[str, Tensor] = _NO_SCORES,
        domains: Tensor | None = None,
        objective: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        # The per-step path: every op here runs once per step for every rank, so only what this run
        # needs is gathered and computed (benchmarks/bookkeeping.py measures it against InfoBatch's).
        # `losses` (each sample's own mean loss) are what weights and the score store see; with token
        # weights, `objective` holds the token-weighted losses that are reduced, and each sample's
        # count of selected tokens, which replace the token counts in the denominators.
        device = losses.device
        detached = losses.detach()
        reduced, selected = (losses, None) if objective is None else (objective[0], objective[1].to(device).float())
        if detached.dtype != torch.float32:
            detached = detached.float()
        if ids is not None and (ids.dtype != torch.long or ids.device != device):
            ids = ids.to(device, torch.long)
        if tokens is not None:
            tokens = tokens.to(device).float()
        # Domain ids travel with the scores (gathered, and filtered with the losses), last, never recorded.
        signals = list(scores.values()) if domains is None else [*scores.values(), domains.to(device, torch.long)]
        if selected is not None:  # the selected-token counts travel last, likewise
            signals.append(selected)
        world = collectives.world_size()
        if world == 1:  # one process: the gather is the identity
            global_losses, global_ids, global_tokens, global_ranks = detached, ids, tokens, None
            global_signals, local = signals, slice(None)
        else:
            columns = [detached]
            if ids is not None:
                columns.append(ids)
            if tokens is not None:
                columns += [tokens, torch.full_like(detached, float(collectives.rank()))]
            columns += signals
            gathered, local = collectives.all_gather_variable(*columns)
            global_losses, rest = gathered[0], iter(gathered[1:])
            global_ids = next(rest) if ids is not None else None
            global_tokens = next(rest) if tokens is not None else None
            global_ranks = next(rest) if tokens is not None else None
            global_signals = list(rest)

        # One reduction and one host read per step: the dot product (one kernel, the cheapest
        # reduction) is finite unless a loss is not, or it overflows - then _drop_nonfinite looks closer.
        if not math.isfinite(float(global_losses.dot(global_losses))):
            global_losses, global_ids, global_tokens, global_ranks, global_signals, reduced, local = self._drop_nonfinite(
                global_losses, global_ids, global_tokens, global_ranks, global_signals, reduced, local
            )
        global_selected = global_signals.pop() if selected is not None else None
        token_counts = None if global_selected is None else self._account_tokens(global_tokens, global_selected)
        if global_ids is not None:
            for name, values in zip(scores, global_signals):
                self.scores.record(name, global_ids, values)
        global_domains = global_signals[-1] if domains is not None else None
        self.step = StepView(global_tokens, global_domains, dict(zip(scores, global_signals)))

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
        self._log(global_losses, weights, token_counts)
        if global_tokens is not None:
            ranks = global_ranks if global_ranks is not None else torch.zeros_like(global_tokens)
            shares = token_shares(global_tokens, ranks, self.token_weighting, world, selected=global_selected)
            weights = shares if weights is None else weights * shares

        # Each rank's share of the global mean; DDP's gradient average over R ranks completes it.
        if world == 1:
            return reduced.mean() if weights is None else weighted_mean(reduced, weights)
        denominator = global_losses.numel() / world
        if weights is None:
            return reduced.mean() if denominator == reduced.numel() else reduced.sum() / denominator
        return weighted_mean(reduced, weights[local], denominator=denominator)

    def _account_tokens(self, global_tokens: Tensor | None, global_selected: Tensor) -> tuple[int, int]:
        """The global micro-batch's valid and selected token counts, told to the token contributors.

        Raises:
            ValueError: a global micro-batch without any valid token.
        """
        valid = 0 if global_tokens is None else int(global_tokens.sum())
        if valid == 0:
            raise ValueError(
                f"the global batch of step {self.trainer.global_step} has no valid token (every label is ignore_index, or"
                " the mask is empty): token weighting needs at least one token with a target - check the labels and the mask"
            )
        selected = int(global_selected.sum())
        for contributor in self.token_contributors:
            contributor.account_tokens(valid, selected)
        return valid, selected

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

    def _log(self, global_losses: Tensor, weights: Tensor | None, token_counts: tuple[int, int] | None = None) -> None:
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
        if token_counts is not None:
            metrics["weightwise/tokens_valid"] = torch.tensor(float(token_counts[0]))
            metrics["weightwise/tokens_selected"] = torch.tensor(float(token_counts[1]))
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
