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

import weakref
from collections.abc import Mapping, Sequence
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
from weightwise.weighting.losses import check_per_sample_loss, weighted_mean

NonFinitePolicy = Literal["raise", "drop"]


class WeightContributor(Protocol):
    """What the reducer needs of a callback that contributes a factor to the samples' weights
    (implemented by :class:`weightwise.weighting.callback.SampleWeightCallback`)."""

    nonfinite: NonFinitePolicy
    sample_id_key: str

    def sample_weights(self, losses: Tensor, sample_ids: Tensor, trainer: pl.Trainer) -> Tensor | None: ...


_REDUCERS: weakref.WeakKeyDictionary[pl.LightningModule, PerSampleLossReducer] = weakref.WeakKeyDictionary()


class PerSampleLossReducer:
    """Reduces ``training_step``'s ``[B]`` losses with the combined weight of all weightwise callbacks.

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
    ) -> None:
        self.trainer = trainer
        self.module = pl_module
        self.contributors = contributors
        self.nonfinite = nonfinite
        self.sample_id_key = sample_id_key
        self.scores = SampleScoreStore()
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
                ``nonfinite`` or ``sample_id_key``.
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
        for option in ("nonfinite", "sample_id_key"):
            values = {getattr(cb, option) for cb in contributors}
            if len(values) > 1:
                raise MisconfigurationException(
                    f"weightwise callbacks disagree on {option}={sorted(values)}; give them all the same value"
                )
        reducer = cls(trainer, pl_module, contributors, contributors[0].nonfinite, contributors[0].sample_id_key)

        def make_training_step(original: Any) -> Any:
            def training_step(*args: Any, **kwargs: Any) -> Any:
                batch = args[0] if args else kwargs["batch"]
                return reducer.reduce(original(*args, **kwargs), batch)

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
        """Turn one ``training_step`` output into the same output with a scalar, weighted loss."""
        if output is None:  # Lightning's "skip this step"
            return None
        if isinstance(output, Mapping):
            if "loss" not in output:
                raise MisconfigurationException("training_step returned a dict without a 'loss' key")
            extra = {k: v for k, v in output.items() if k not in ("loss", "sample_ids", "scores")}
            losses, ids, signals = output["loss"], output.get("sample_ids"), output.get("scores", {})
        else:
            extra, losses, ids, signals = None, output, None, {}
        if ids is None:
            ids = sample_ids_from_batch(batch, self.sample_id_key)
        losses = check_per_sample_loss(losses, batch_size=int(ids.numel()))
        loss = self._weighted_loss(losses, ids.to(losses.device), self._check_signals(signals, losses))
        return loss if extra is None else {"loss": loss, **extra}

    @staticmethod
    def _check_signals(signals: Any, losses: Tensor) -> dict[str, Tensor]:
        if not isinstance(signals, Mapping) or not all(
            isinstance(v, Tensor) and v.shape == losses.shape for v in signals.values()
        ):
            raise ValueError(
                "training_step's 'scores' must be a dict of per-sample tensors shaped like the loss"
                f" {tuple(losses.shape)}, e.g. {{'el2n': weightwise.losses.el2n(logits, y)}}"
            )
        return {name: v.detach().float().to(losses.device) for name, v in signals.items()}

    def _weighted_loss(self, losses: Tensor, ids: Tensor, signals: dict[str, Tensor]) -> Tensor:
        names = list(signals)
        gathered, local = collectives.all_gather_variable(losses.float(), ids.long(), *signals.values())
        global_losses, global_ids, global_signals = gathered[0], gathered[1], gathered[2:]
        finite = torch.isfinite(global_losses)
        n_finite = int(finite.sum())
        if n_finite < global_losses.numel():
            self._handle_nonfinite(global_ids[~finite], n_finite)
            global_losses, global_ids = global_losses[finite], global_ids[finite]
            global_signals = [values[finite] for values in global_signals]
            local_finite = finite[local]
            local = slice(int(finite[: local.start].sum()), int(finite[: local.stop].sum()))
            losses = losses[local_finite]
        for name, values in zip(names, global_signals):
            self.scores.record(name, global_ids, values)

        weights = torch.ones_like(global_losses)
        for contributor in self.contributors:
            factor = contributor.sample_weights(global_losses, global_ids, self.trainer)
            if factor is not None:
                weights = weights * factor.detach().to(weights)
        self.scores.update(global_ids, global_losses, self.trainer.global_step, weights=weights)
        self._log(global_losses, weights)

        local_weights = weights[local]
        # Each rank's share of the global mean; DDP's gradient average over R ranks completes it.
        denominator = global_losses.numel() / collectives.world_size()
        return weighted_mean(losses, local_weights, denominator=denominator)

    def _handle_nonfinite(self, bad_ids: Tensor, n_finite: int) -> None:
        shown = bad_ids[:10].tolist()
        if self.nonfinite == "raise" or n_finite == 0:
            reason = "every sample in the global batch" if n_finite == 0 else f"{bad_ids.numel()} sample(s)"
            raise FloatingPointError(
                f"non-finite per-sample loss at step {self.trainer.global_step} for {reason}, sample ids {shown}."
                " Check those samples and the learning rate; to train on and skip such samples (counted and logged"
                " as weightwise/nonfinite_dropped), pass nonfinite='drop' to the weightwise callbacks."
            )
        self.nonfinite_dropped += bad_ids.numel()
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

    def _log(self, global_losses: Tensor, weights: Tensor) -> None:
        # LightningModule.log costs ~1.5 ms a metric on a CPU - more than a small model's step - and
        # step-level values are only written every log_every_n_steps, so log only on those steps.
        if not is_logging_step(self.trainer):
            return
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
