"""Which layers train in each period: the layer-choice policies, free of Lightning.

A policy answers one question per period - *which layers of the stack train now* - from values
every data-parallel rank shares (docs/architecture.md, contract 5): a seed, the period index and
statistics the caller has already reduced over the ranks. So every rank draws the same layers,
and a resumed run (which restores :meth:`LayerPolicy.state_dict`) draws what the uninterrupted
one would have. :class:`weightwise.layers.callback.LayerwiseSampling` applies the choice
(freezing, optimizer state, DDP/ZeRO); any other loop can call :meth:`LayerPolicy.choose` itself.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from weightwise.core.checkpoints import state_version, with_version


class LayerPolicy:
    """Base class: chooses ``n_active`` of ``num_layers`` layers for each period.

    Args:
        num_layers: layers in the stack.
        n_active: layers that train per period.
        seed: base seed of the draws; period p draws from ``seed * 100003 + p``.

    Raises:
        ValueError: ``n_active`` outside ``[1, num_layers]``.
    """

    name: ClassVar[str]
    STATE_VERSION = 1

    def __init__(self, num_layers: int, n_active: int, seed: int = 0) -> None:
        if not 1 <= n_active <= num_layers:
            raise ValueError(f"n_layers={n_active} but the layer stack has {num_layers} layers")
        self.num_layers = num_layers
        self.n_active = n_active
        self.seed = seed

    def generator(self, period: int) -> torch.Generator:
        """The random source of ``period``'s draw: the same on every rank and after a resume."""
        return torch.Generator().manual_seed(self.seed * 100_003 + period)

    def choose(self, period: int) -> list[int]:
        """The sorted layer indices that train in ``period``."""
        raise NotImplementedError

    def end_period(self, mean_loss: float) -> None:
        """Feed the finished period's mean training loss, already reduced over every rank."""

    @property
    def importance(self) -> Tensor | None:
        """Per-layer scores to log (``None`` for policies without any)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return with_version({}, self.STATE_VERSION)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state_version(state, type(self).__name__, self.STATE_VERSION)


class UniformLayers(LayerPolicy):
    """LISA (Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
    Model Fine-Tuning", 2024; LMFlow's ``DynamicLayerActivationCallback``): ``n_active`` layers
    drawn uniformly without replacement, anew every period."""

    name = "lisa"

    def choose(self, period: int) -> list[int]:
        return sorted(torch.randperm(self.num_layers, generator=self.generator(period))[: self.n_active].tolist())


class LossCreditLayers(LayerPolicy):
    """Layers drawn by a learned score that credits each period's loss decrease to its active layers.

    A period's reward is the decrease of the mean training loss from the previous period;
    ``s_l <- (1 - beta) s_l + beta * reward`` for the layers that were active, and layers are drawn
    without replacement with probability ``softmax(s / temperature)``.

    Args:
        num_layers, n_active, seed: see :class:`LayerPolicy`.
        beta: smoothing of the scores.
        temperature: sampling temperature of the softmax.
    """

    name = "loss_credit"

    def __init__(self, num_layers: int, n_active: int, seed: int = 0, *, beta: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__(num_layers, n_active, seed)
        if not 0.0 < beta <= 1.0 or temperature <= 0:
            raise ValueError(f"beta must be in (0, 1] and temperature positive, got beta={beta}, temperature={temperature}")
        self.beta = beta
        self.temperature = temperature
        self.scores = torch.zeros(num_layers)
        self.previous_mean: float | None = None
        self.active: list[int] = []

    @property
    def importance(self) -> Tensor:
        return self.scores

    def choose(self, period: int) -> list[int]:
        probs = torch.softmax(self.scores / self.temperature, dim=0)
        self.active = sorted(torch.multinomial(probs, self.n_active, replacement=False, generator=self.generator(period)).tolist())
        return self.active

    def end_period(self, mean_loss: float) -> None:
        if self.previous_mean is not None:
            reward = self.previous_mean - mean_loss
            for i in self.active:
                self.scores[i] = (1 - self.beta) * self.scores[i] + self.beta * reward
        self.previous_mean = mean_loss

    def state_dict(self) -> dict[str, Any]:
        return with_version(
            {"scores": self.scores.clone(), "previous_mean": self.previous_mean, "active": list(self.active)}, self.STATE_VERSION
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scores = state["scores"].clone()
        self.previous_mean = state["previous_mean"]
        self.active = list(state["active"])
