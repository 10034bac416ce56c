"""``ComputeBudget``: train until a budget of FLOPs or tokens is spent, counting what every method spends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from weightwise.compute.meter import Backward, ComputeMeter, Measure, Spent, count_tokens
from weightwise.core import collectives
from weightwise.core.checkpoints import state_version, with_version
from weightwise.integrations.lightning import is_logging_step

UNITS = ("flops", "tokens", "backward_tokens")


class ComputeBudget(pl.Callback):
    """Stop the fit when a compute budget is spent: FLOPs, tokens consumed, or tokens backpropagated.

    Everything that runs during the fit's training is counted (:mod:`weightwise.compute.meter`): the
    trained model's forwards and backwards, online selection's extra forward, the scoring passes of
    DataPruning's samplers, reference models (RHO-LOSS, perplexity), IST's probes and block-influence
    passes - each rank's, summed over ranks just before every optimizer step (one all-reduce of a few
    integers), so every rank stops at the same step. The fit stops after the optimizer step that
    reaches the budget: it overshoots by less than one step. Validation and the sanity check are not
    counted. With gradient accumulation every micro-batch counts; the spent amounts are in the
    checkpoint, so a resumed run stops where the uninterrupted one does.

    Attributes:
        spent: :class:`~weightwise.compute.Spent` summed over ranks (as of the last optimizer step).
        fraction: the spent share of the budget, in [0, 1]; schedules read it
            (:func:`~weightwise.compute.budget_lr_lambda`).

    Logged every logging step: ``weightwise/flops``, ``weightwise/flops_forward``,
    ``weightwise/flops_backward``, ``weightwise/flops_saved`` (against training every consumed
    token with a full forward and backward: :attr:`Spent.flops_saved`), ``weightwise/tokens`` and
    ``weightwise/budget_fraction``. With a ``WandbLogger``, W&B plots every metric against
    ``weightwise/flops`` (``define_metric``; ``wandb_x_axis=False`` keeps the step).

    Args:
        flops: the budget in FLOPs (forward + backward, all sources, all ranks).
        tokens: the budget in tokens of the training batches consumed (all ranks).
        backward_tokens: the budget in tokens backpropagated by the trained model (all ranks).
        measure, backward: how FLOPs are counted: see :class:`~weightwise.compute.ComputeMeter`.
        tokens_of: ``batch -> tokens`` of a training batch (default:
            :func:`~weightwise.compute.count_tokens`: the elements of ``input_ids``, padding included).
        wandb_x_axis: make ``weightwise/flops`` W&B's x-axis.

    Raises:
        ValueError: not exactly one unit, or a budget that is not positive.
        MisconfigurationException: (during the fit) a budget smaller than the first optimizer step's
            spending, no FLOPs counted for a FLOP budget (no matrix product ran inside a module), or
            no tokens found in the batches for a token budget (pass ``tokens_of=``).

    Example::

        >>> import lightning.pytorch as pl
        >>> from weightwise.callbacks import ComputeBudget
        >>> budget = ComputeBudget(flops=3e15)
        >>> trainer = pl.Trainer(max_epochs=-1, callbacks=[budget], logger=False)
    """

    STATE_VERSION = 1

    def __init__(
        self,
        flops: float | None = None,
        tokens: int | None = None,
        backward_tokens: int | None = None,
        *,
        measure: Measure = "per_signature",
        backward: Backward = "rule",
        tokens_of: Callable[[Any], int | None] | None = None,
        wandb_x_axis: bool = True,
    ) -> None:
        given = {unit: value for unit, value in zip(UNITS, (flops, tokens, backward_tokens)) if value is not None}
        if len(given) != 1:
            raise ValueError(
                f"give ComputeBudget exactly one unit - flops=..., tokens=... or backward_tokens=... - got {sorted(given) or 'none'}"
            )
        (self.unit, self.budget), = given.items()
        if not self.budget > 0:
            raise ValueError(f"the budget must be positive, got {self.unit}={self.budget}")
        ComputeMeter(torch.nn.Module(), measure, backward)  # refuses bad settings now, not at fit start
        self.measure: Measure = measure
        self.backward: Backward = backward
        self.tokens_of = tokens_of or count_tokens
        self.wandb_x_axis = wandb_x_axis
        self.spent = Spent()
        self.meter: ComputeMeter | None = None
        self._steps_synced = 0

    @property
    def fraction(self) -> float:
        """The spent share of the budget, in [0, 1]."""
        return min(1.0, self._spent_in_unit() / self.budget)

    def _spent_in_unit(self) -> float:
        return float(self.spent.flops if self.unit == "flops" else getattr(self.spent, self.unit))

    # ------------------------------------------------------------------ lifecycle
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.meter = ComputeMeter(pl_module, self.measure, self.backward)
        self.meter.install()
        if self.wandb_x_axis:
            self._define_wandb_axis(trainer)

    def _define_wandb_axis(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.define_metric("weightwise/flops")
                logger.experiment.define_metric("*", step_metric="weightwise/flops", step_sync=True)

    def _release(self) -> None:
        if self.meter is not None:
            self.meter.uninstall()
            self.meter = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def _pause(self, paused: bool) -> None:
        if self.meter is not None:
            self.meter.paused = paused

    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause(True)

    @override
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause(False)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause(True)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause(trainer.sanity_checking)

    # ------------------------------------------------------------------ the step
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.meter is not None
        tokens = self.tokens_of(batch)
        if tokens is None and self.unit != "flops":
            raise MisconfigurationException(
                f"ComputeBudget({self.unit}=...) found no tokens in the training batch (no 'input_ids', integer or"
                " other tensor); pass tokens_of=lambda batch: <its token count>"
            )
        self.meter.discard_pending()
        self.meter.add_tokens(int(tokens or 0))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        assert self.meter is not None
        self.meter.begin_backward()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.meter is not None
        self.meter.end_backward()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        # Before the step, so the scheduler stepped after it reads a fraction that includes it.
        assert self.meter is not None
        local = torch.tensor(self.meter.take().as_vector(), dtype=torch.long, device=pl_module.device)
        summed = collectives.all_reduce_sum(local).tolist()
        self.spent = self.spent + Spent.from_vector(summed)
        self._steps_synced += 1
        if self._steps_synced == 1:
            self._check_first_step()
        if self._spent_in_unit() >= self.budget:
            trainer.should_stop = True

    def _check_first_step(self) -> None:
        if self.unit == "flops" and self.spent.flops == 0:
            raise MisconfigurationException(
                "ComputeBudget(flops=...) counted no FLOPs in the first optimizer step: torch's FlopCounterMode saw no"
                " matrix product, convolution or attention inside a module call. Run the model's compute inside"
                " nn.Module calls, or budget tokens=... / backward_tokens=... instead"
            )
        if self.unit == "backward_tokens" and self.spent.backward_tokens == 0:
            raise MisconfigurationException(
                "ComputeBudget(backward_tokens=...) counted no backpropagated tokens in the first optimizer step: the"
                " trained model ran no forward with gradients inside a module call; budget flops=... or tokens=... instead"
            )
        first = self._spent_in_unit()
        if first > self.budget:
            raise MisconfigurationException(
                f"ComputeBudget({self.unit}={self.budget:.6g}) is smaller than the first optimizer step, which spent"
                f" {first:.6g} (all ranks); raise the budget to a multiple of that"
            )

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not is_logging_step(trainer) or self._steps_synced == 0:
            return
        spent = self.spent
        metrics = {
            "weightwise/flops": float(spent.flops),
            "weightwise/flops_forward": float(spent.forward_flops),
            "weightwise/flops_backward": float(spent.backward_flops),
            "weightwise/tokens": float(spent.tokens),
            "weightwise/budget_fraction": self.fraction,
        }
        if spent.flops_saved is not None:
            metrics["weightwise/flops_saved"] = spent.flops_saved
        # Identical on every rank (summed over ranks): no sync needed.
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ checkpoints (docs/architecture.md, contract 4)
    @override
    def state_dict(self) -> dict[str, Any]:
        return with_version(
            {"unit": self.unit, "budget": self.budget, "spent": self.spent.as_vector(), "steps_synced": self._steps_synced},
            self.STATE_VERSION,
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_version(state_dict, "ComputeBudget", self.STATE_VERSION)
        if state_dict["unit"] != self.unit:
            raise ValueError(f"the checkpoint's budget is in {state_dict['unit']}, this run's in {self.unit}: give the same unit")
        self.spent = Spent.from_vector(state_dict["spent"])
        self._steps_synced = int(state_dict["steps_synced"])


def find_budget(trainer: pl.Trainer) -> ComputeBudget:
    """The trainer's :class:`ComputeBudget` - for a ``configure_optimizers`` that schedules over it.

    Raises:
        MisconfigurationException: the trainer has no ComputeBudget callback, or more than one.

    Example::

        >>> import lightning.pytorch as pl
        >>> from weightwise.compute import ComputeBudget, find_budget
        >>> trainer = pl.Trainer(callbacks=[ComputeBudget(tokens=10_000)], logger=False)
        >>> find_budget(trainer).budget
        10000
    """
    found = [cb for cb in trainer.callbacks if isinstance(cb, ComputeBudget)]
    if len(found) != 1:
        raise MisconfigurationException(
            f"the trainer has {len(found)} ComputeBudget callbacks; a budget schedule needs exactly one:"
            " Trainer(callbacks=[ComputeBudget(flops=...)])"
        )
    return found[0]
