"""``LossReweighting``: online loss-based sample reweighting as a Lightning callback."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from weightwise.callbacks.base import SampleWeightCallback
from weightwise.callbacks.reduction import NonFinitePolicy
from weightwise.data import SAMPLE_ID_KEY
from weightwise.losses.reweighting import STRATEGIES, Strategy, loss_weights


class LossReweighting(SampleWeightCallback):
    """Weight each sample of every step by its loss relative to the rest of the global batch.

    Implements the strategies of Sow et al., "Dynamic Loss-Based Sample Reweighting for Improved
    Large Language Model Pretraining" (ICLR 2025): ``w = B * softmax(f(l~) / r)`` with the losses
    ``l~`` normalised to [-delta, delta] over the global batch and ``f`` one of

    * ``"linupper"`` ``min(l~ + delta, delta)`` - down-weights the easiest samples;
    * ``"quadratic"`` ``1 - l~^2 / delta^2`` - down-weights both extremes (outliers, mislabelled);
    * ``"extremes"`` ``|l~|`` - up-weights both extremes;
    * ``"uniform"`` - weight 1: exactly plain mean-loss training.

    See :mod:`weightwise.losses.reweighting` for the derivation. Weights have mean 1 over the
    global batch, are non-negative and detached. The ``LightningModule``'s ``training_step``
    returns the unreduced loss ``[B]`` and the batch carries sample ids
    (:class:`weightwise.IndexedDataset`); nothing else changes.

    Args:
        strategy: one of ``"uniform"``, ``"linupper"``, ``"quadratic"``, ``"extremes"``.
        delta: half-width of the normalised loss range (paper default 1).
        temperature: the paper's ``r``; larger is closer to uniform (paper default 1).
        nonfinite: ``"raise"`` or ``"drop"`` (see :class:`SampleWeightCallback`).
        sample_id_key: batch key carrying the dataset indices.

    Example::

        trainer = pl.Trainer(callbacks=[LossReweighting(strategy="quadratic")])
    """

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

    def sample_weights(self, losses: Tensor, sample_ids: Tensor, trainer: pl.Trainer) -> Tensor:
        return loss_weights(losses, self.strategy, delta=self.delta, temperature=self.temperature)

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "delta": self.delta, "temperature": self.temperature}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict["strategy"], state_dict["delta"], state_dict["temperature"])
        if saved != (self.strategy, self.delta, self.temperature):
            raise ValueError(
                f"the checkpoint was trained with LossReweighting{saved} (strategy, delta, temperature) but this run"
                f" uses {(self.strategy, self.delta, self.temperature)}; resume with the same settings"
            )
