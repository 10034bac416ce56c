"""Lightning callbacks of sample weighting: the base of every weight contributor, and ``LossReweighting``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from weightwise.core.checkpoints import state_version, with_version
from weightwise.core.ids import SAMPLE_ID_KEY
from weightwise.integrations.lightning import check_trainer
from weightwise.weighting.reducer import NonFinitePolicy, PerSampleLossReducer
from weightwise.weighting.reweighting import STRATEGIES, Strategy, loss_weights

CHECKPOINT_KEY = "weightwise"
"""Where the shared reducer's state (the score store) lives in a Lightning checkpoint."""


class SampleWeightCallback(Callback):
    """A Lightning callback that weights samples; all of them share one :class:`PerSampleLossReducer`.

    Subclasses implement :meth:`sample_weights`. The shared reducer multiplies every subclass'
    factor into one weight per sample, reduces the loss, and keeps the score store, which is
    saved in checkpoints under ``checkpoint["weightwise"]``.

    Args:
        nonfinite: ``"raise"`` (default) stops on a NaN/inf per-sample loss with the sample ids;
            ``"drop"`` leaves such samples out of the step and counts them
            (``weightwise/nonfinite_dropped``).
        sample_id_key: the batch key carrying dataset indices (see :class:`weightwise.IndexedDataset`).

    Raises:
        ValueError: an unknown ``nonfinite`` policy.
    """

    def __init__(self, *, nonfinite: NonFinitePolicy = "raise", sample_id_key: str = SAMPLE_ID_KEY) -> None:
        if nonfinite not in ("raise", "drop"):
            raise ValueError(f"nonfinite must be 'raise' or 'drop', got {nonfinite!r}")
        self.nonfinite: NonFinitePolicy = nonfinite
        self.sample_id_key = sample_id_key
        self.reducer: PerSampleLossReducer | None = None

    def sample_weights(self, losses: Tensor, sample_ids: Tensor, trainer: pl.Trainer) -> Tensor | None:
        """This callback's factor for each sample of the global batch (``None``: all ones).

        Args:
            losses: ``[B_global]`` finite per-sample losses of every rank, detached.
            sample_ids: ``[B_global]`` their dataset indices.
            trainer: the running trainer.
        """
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_trainer(trainer)
            contributors = [cb for cb in trainer.callbacks if isinstance(cb, SampleWeightCallback)]
            self.reducer = PerSampleLossReducer.install(trainer, pl_module, contributors)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.reducer is not None:
            self.reducer.uninstall()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reducer is not None:
            self.reducer.check_gradients_after_drop()

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.reducer is not None and CHECKPOINT_KEY not in checkpoint:
            checkpoint[CHECKPOINT_KEY] = self.reducer.state_dict()

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.reducer is not None and CHECKPOINT_KEY in checkpoint:
            self.reducer.load_state_dict(checkpoint[CHECKPOINT_KEY])


class LossReweighting(SampleWeightCallback):
    """Weight each sample of every step by its loss relative to the rest of the global batch.

    Implements the strategies of Sow et al., "Dynamic Loss-Based Sample Reweighting for Improved
    Large Language Model Pretraining" (ICLR 2025): ``w = B * softmax(f(l~) / r)`` with the losses
    ``l~`` normalised to [-delta, delta] over the global batch and ``f`` one of

    * ``"linupper"`` ``min(l~ + delta, delta)`` - down-weights the easiest samples;
    * ``"quadratic"`` ``1 - l~^2 / delta^2`` - down-weights both extremes (outliers, mislabelled);
    * ``"extremes"`` ``|l~|`` - up-weights both extremes;
    * ``"uniform"`` - weight 1: exactly plain mean-loss training.

    See :mod:`weightwise.weighting.reweighting` for the derivation. Weights have mean 1 over the
    global batch, are non-negative and detached. The ``LightningModule``'s ``training_step``
    returns the unreduced loss ``[B]`` and the batch carries sample ids
    (:class:`weightwise.IndexedDataset`); nothing else changes.

    Args:
        strategy: one of ``"uniform"``, ``"linupper"``, ``"quadratic"``, ``"extremes"``.
        delta: half-width of the normalised loss range (paper default 1).
        temperature: the paper's ``r``; larger is closer to uniform.
        nonfinite: ``"raise"`` or ``"drop"`` (see :class:`SampleWeightCallback`).
        sample_id_key: batch key carrying the dataset indices.

    Raises:
        ValueError: an unknown strategy, or a non-positive ``delta`` or ``temperature``.

    Example::

        >>> import lightning.pytorch as pl
        >>> from weightwise.callbacks import LossReweighting
        >>> trainer = pl.Trainer(callbacks=[LossReweighting(strategy="quadratic")], logger=False)
    """

    STATE_VERSION = 1

    def __init__(
        self,
        strategy: Strategy = "linupper",
        *,
        delta: float = 1.0,
        temperature: float = 1.0,
        nonfinite: NonFinitePolicy = "raise",
        sample_id_key: str = SAMPLE_ID_KEY,
    ) -> None:
        super().__init__(nonfinite=nonfinite, sample_id_key=sample_id_key)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown reweighting strategy {strategy!r}; choose one of {STRATEGIES}")
        if delta <= 0 or temperature <= 0:
            raise ValueError(f"delta and temperature must be positive, got delta={delta}, temperature={temperature}")
        self.strategy: Strategy = strategy
        self.delta = delta
        self.temperature = temperature

    @override
    def sample_weights(self, losses: Tensor, sample_ids: Tensor, trainer: pl.Trainer) -> Tensor:
        return loss_weights(losses, self.strategy, delta=self.delta, temperature=self.temperature)

    @override
    def state_dict(self) -> dict[str, Any]:
        return with_version({"strategy": self.strategy, "delta": self.delta, "temperature": self.temperature}, self.STATE_VERSION)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_version(state_dict, "LossReweighting", self.STATE_VERSION)
        saved = (state_dict["strategy"], state_dict["delta"], state_dict["temperature"])
        if saved != (self.strategy, self.delta, self.temperature):
            raise ValueError(
                f"the checkpoint was trained with LossReweighting{saved} (strategy, delta, temperature) but this run"
                f" uses {(self.strategy, self.delta, self.temperature)}; resume with the same settings"
            )
