"""Which layers train in each period: the layer-choice policies, free of Lightning.

A policy answers one question per period - *which layers of the stack train now* - from values
every data-parallel rank shares (docs/architecture.md, contract 5): a seed, the period index and
statistics the caller has already reduced over the ranks. So every rank draws the same layers,
and a resumed run (which restores :meth:`LayerPolicy.state_dict`) draws what the uninterrupted
one would have. :class:`weightwise.layers.callback.LayerwiseSampling` applies the choice
(freezing, optimizer state, DDP/ZeRO); any other loop can call :meth:`LayerPolicy.choose` itself.

Policies (the callback's names): ``"lisa"`` :class:`UniformLayers`, ``"ist"`` :class:`ISTLayers`,
``"badam"`` :class:`OrderedBlocks`, ``"loss_credit"`` :class:`LossCreditLayers`,
``"block_influence"`` :class:`BlockInfluenceLayers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from weightwise.core.checkpoints import state_version, with_version


class LayerPolicy:
    """Base class: chooses ``n_active`` layers of a stack of ``num_layers`` for each period.

    Args:
        num_layers: layers in the stack.
        n_active: layers drawn per period (besides the ``pinned`` ones).
        seed: base seed of the draws; period p draws from ``seed * 100003 + p``.
        pinned: layers that train in every period, on top of the drawn ones.

    Raises:
        ValueError: ``n_active`` outside ``[1, num_layers - len(pinned)]`` or a pinned index outside the stack.
    """

    name: ClassVar[str]
    needs_period_loss: ClassVar[bool] = False
    """Whether :meth:`end_period` wants the period's mean loss (a collective per period)."""
    STATE_VERSION = 1

    def __init__(self, num_layers: int, n_active: int, seed: int = 0, pinned: Sequence[int] = ()) -> None:
        bad = [i for i in pinned if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"pinned layers {bad} are outside the stack of {num_layers} layers")
        self.pinned = sorted(set(pinned))
        self.candidates = [i for i in range(num_layers) if i not in self.pinned]
        if not 1 <= n_active <= len(self.candidates):
            raise ValueError(
                f"n_layers={n_active} but the layer stack has {num_layers} layers"
                + (f", {len(self.pinned)} of them pinned" if self.pinned else "")
            )
        self.num_layers = num_layers
        self.n_active = n_active
        self.seed = seed

    def generator(self, period: int) -> torch.Generator:
        """The random source of ``period``'s draw: the same on every rank and after a resume."""
        return torch.Generator().manual_seed(self.seed * 100_003 + period)

    def choose(self, period: int) -> list[int]:
        """The sorted layer indices that train in ``period``: the pinned ones and the drawn ones."""
        return sorted(self.pinned + [self.candidates[i] for i in self.draw(period)])

    def draw(self, period: int) -> list[int]:
        """``n_active`` positions in :attr:`candidates` for ``period``."""
        raise NotImplementedError

    def end_period(self, mean_loss: float) -> None:
        """Feed the finished period's mean training loss, already reduced over every rank."""

    def wants_probes(self, step: int) -> bool:
        """Whether the policy measures layers with suppression probes before ``step``."""
        return False

    def wants_influence(self, period: int) -> bool:
        """Whether the policy wants the layers' block influence measured before ``period``'s draw."""
        return False

    @property
    def importance(self) -> Tensor | None:
        """Per-layer scores to log (``None`` for policies without any)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return with_version({"name": self.name}, self.STATE_VERSION)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state_version(state, type(self).__name__, self.STATE_VERSION)
        saved = state.get("name", self.name)
        if saved != self.name:
            raise ValueError(f"the checkpoint holds the state of layer policy {saved!r}, this run uses {self.name!r}")


class UniformLayers(LayerPolicy):
    """LISA (Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
    Model Fine-Tuning", 2024; LMFlow ``src/lmflow/pipeline/utils/lisa_trainer.py``,
    ``DynamicLayerActivationCallback``): ``n_active`` layers drawn uniformly without replacement,
    anew every period (reference defaults: 2 layers, every 20 steps)."""

    name = "lisa"

    def draw(self, period: int) -> list[int]:
        return torch.randperm(len(self.candidates), generator=self.generator(period))[: self.n_active].tolist()


class LossCreditLayers(LayerPolicy):
    """Layers drawn by a score that credits each period's loss decrease to its active layers.

    weightwise 0.1 called this ``"ist"``; it is not IST (see :class:`ISTLayers`). A period's reward is
    the decrease of the mean training loss (over every rank) from the previous period;
    ``s_l <- (1 - beta) s_l + beta * reward`` for the layers that were active, and layers are drawn
    without replacement with probability ``softmax(s / temperature)``.

    Args:
        num_layers, n_active, seed, pinned: see :class:`LayerPolicy`.
        beta: smoothing of the scores.
        temperature: sampling temperature of the softmax.

    Raises:
        ValueError: ``beta`` outside (0, 1] or a non-positive temperature.
    """

    name = "loss_credit"
    needs_period_loss = True

    def __init__(
        self, num_layers: int, n_active: int, seed: int = 0, pinned: Sequence[int] = (), *, beta: float = 0.5, temperature: float = 1.0
    ) -> None:
        super().__init__(num_layers, n_active, seed, pinned)
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

    def draw(self, period: int) -> list[int]:
        probs = torch.softmax(self.scores[self.candidates] / self.temperature, dim=0)
        drawn = torch.multinomial(probs, self.n_active, replacement=False, generator=self.generator(period)).tolist()
        self.active = [self.candidates[i] for i in drawn]
        return drawn

    def end_period(self, mean_loss: float) -> None:
        if self.previous_mean is not None:
            reward = self.previous_mean - mean_loss
            for i in self.active:
                self.scores[i] = (1 - self.beta) * self.scores[i] + self.beta * reward
        self.previous_mean = mean_loss

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scores": self.scores.clone(), "previous_mean": self.previous_mean, "active": list(self.active)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scores = state["scores"].clone()
        self.previous_mean = state["previous_mean"]
        self.active = list(state["active"])


Order = Literal["ascending", "descending", "random"]


class OrderedBlocks(LayerPolicy):
    """BAdam's block cycles (Luo et al., "BAdam: A Memory Efficient Full Parameter Optimization
    Method for Large Language Models", 2024; ``Ledzy/BAdam``, ``src/badam/block_optim.py``): one
    block (here: ``n_active`` layers) at a time, every layer visited once per cycle.

    * ``"descending"`` (the code's default ``switch_mode``): from the last layer down;
    * ``"ascending"``: from the first layer up;
    * ``"random"``: a fresh random order every cycle (random reshuffling).

    BAdam's code switches after ``switch_block_every - 1`` steps for the first block and every
    ``switch_block_every`` after; here every period has the callback's ``interval`` steps.

    Embeddings and head: BAdam freezes them by default (``include_embedding=False``,
    ``include_lm_head=False``), as ``LayerwiseSampling("badam")`` does (``train_outside_stack=False``).
    BAdam's ``include_embedding=True`` / ``include_lm_head=True`` make them *extra blocks of the
    cycle* (``infer_param_groups``: the embeddings a block before the first layer, the head with
    every other parameter outside the layers a block after the last), each trained for its own
    period like a layer. ``train_outside_stack=True`` is not that: it trains them at *every* step
    beside the cycle's block (LISA's arrangement), and BAdam's blocks-in-the-cycle variant is not
    offered.

    Args:
        num_layers, n_active, seed, pinned: see :class:`LayerPolicy`.
        order: the block order.

    Raises:
        ValueError: an unknown order.
    """

    name = "badam"

    def __init__(self, num_layers: int, n_active: int = 1, seed: int = 0, pinned: Sequence[int] = (), *, order: Order = "descending") -> None:
        super().__init__(num_layers, n_active, seed, pinned)
        if order not in ("ascending", "descending", "random"):
            raise ValueError(f"order must be 'ascending', 'descending' or 'random', got {order!r}")
        self.order: Order = order

    def _cycle(self, index: int) -> list[int]:
        n = len(self.candidates)
        if self.order == "ascending":
            return list(range(n))
        if self.order == "descending":
            return list(range(n - 1, -1, -1))
        return torch.randperm(n, generator=self.generator(-1 - index)).tolist()

    def draw(self, period: int) -> list[int]:
        n = len(self.candidates)
        start = period * self.n_active
        return [self._cycle(position // n)[position % n] for position in range(start, start + self.n_active)]


class ISTLayers(LayerPolicy):
    """IST (Yao et al., "IST: Importance-aware Sparse Tuning", EMNLP 2024 Findings; authors' code
    ``antgroup/importance-aware-sparse-tuning-IST-paper``, ``ist.py``, ``ISTCallback``).

    * Every step, ``n_active`` layers (the reference: 25% of the stack) are drawn without
      replacement with probability proportional to ``sigmoid(-s)``.
    * Every ``probe_every`` steps (10; from step 10 on), ``probes`` (3) probes each suppress a
      random half of the layers - drawn with probability ``sigmoid(s)``, distinct probes - by scaling
      their response by ``suppression`` (0.25), and measure the loss ``L_k`` on one probe batch in
      eval mode without gradients (the reference draws its own batch of 16 training samples per
      round: :class:`weightwise.layers.probes.ProbeBatches`). With rewards ``r_k = exp(-L_k)`` and the baseline ``mean_k r_k``, each
      suppressed layer's score moves by ``learning_rate * (r_k - baseline) * p (1 - p)``,
      ``p = sigmoid(s)`` taken before the update (REINFORCE with the sigmoid's derivative;
      ``learning_rate`` 10).

    A high ``s`` means suppressing the layer *helped*, so the layer is drawn *less* often: the
    reference's score is an un-importance. :attr:`importance` returns ``-s``, the importance.

    The probes themselves (suppressing, evaluating, reducing the loss over the ranks) are the
    callback's (:mod:`weightwise.layers.probes`); this class draws and learns.

    Args:
        num_layers, n_active, seed, pinned: see :class:`LayerPolicy`.
        probe_every, probes, suppressed_fraction, learning_rate: the reference's 10, 3, 0.5, 10.

    Raises:
        ValueError: a non-positive setting or a suppressed fraction outside (0, 1).
    """

    name = "ist"

    def __init__(
        self,
        num_layers: int,
        n_active: int,
        seed: int = 0,
        pinned: Sequence[int] = (),
        *,
        probe_every: int = 10,
        probes: int = 3,
        suppressed_fraction: float = 0.5,
        learning_rate: float = 10.0,
    ) -> None:
        super().__init__(num_layers, n_active, seed, pinned)
        if probe_every < 1 or probes < 2 or learning_rate <= 0 or not 0.0 < suppressed_fraction < 1.0:
            raise ValueError(
                "IST needs probe_every >= 1, probes >= 2 (a baseline needs two), learning_rate > 0 and a suppressed"
                f" fraction in (0, 1); got {probe_every}, {probes}, {learning_rate}, {suppressed_fraction}"
            )
        self.probe_every = probe_every
        self.probes = probes
        self.n_suppressed = max(1, int(num_layers * suppressed_fraction))
        self.learning_rate = learning_rate
        self.scores = torch.zeros(num_layers)

    @property
    def importance(self) -> Tensor:
        return -self.scores

    def draw(self, period: int) -> list[int]:
        probs = torch.sigmoid(-self.scores[self.candidates])
        return torch.multinomial(probs, self.n_active, replacement=False, generator=self.generator(period)).tolist()

    def wants_probes(self, step: int) -> bool:
        return step > 0 and step % self.probe_every == 0

    def probe_sets(self, step: int) -> list[list[int]]:
        """The layer sets the probes before ``step`` suppress: distinct where the stack allows it."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + step + 7_919 * 100_003)
        probs = torch.sigmoid(self.scores)
        sets: list[list[int]] = []
        for _ in range(self.probes):
            for _attempt in range(100):  # the reference redraws duplicates; a tiny stack may not allow it
                chosen = sorted(torch.multinomial(probs, self.n_suppressed, replacement=False, generator=generator).tolist())
                if chosen not in sets:
                    break
            sets.append(chosen)
        return sets

    def learn(self, probe_sets: Sequence[Sequence[int]], losses: Sequence[float]) -> None:
        """The REINFORCE update from each probe's suppressed layers and loss (reduced over the ranks)."""
        if len(probe_sets) != len(losses):
            raise ValueError(f"{len(probe_sets)} probe sets but {len(losses)} losses")
        rewards = torch.exp(-torch.tensor(losses, dtype=torch.float64))
        baseline = rewards.mean()
        p = torch.sigmoid(self.scores.double())
        slope = p * (1 - p)
        update = torch.zeros_like(p)
        for layers, reward in zip(probe_sets, rewards):
            index = torch.tensor(list(layers), dtype=torch.long)
            update[index] += self.learning_rate * (reward - baseline) * slope[index]
        self.scores += update.to(self.scores.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scores": self.scores.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scores = state["scores"].clone()


class BlockInfluenceLayers(LayerPolicy):
    """Layers drawn with probability increasing in their block influence (ShortGPT's BI).

    ShortGPT (Men et al., 2024; ``icip-cas/ShortGPT``, ``shortgpt/metrics.py``) measures how much each
    layer turns the hidden states, ``BI_i = 1 - E[cos(x_i, x_{i+1})]``, and finds the low-BI layers
    redundant (:mod:`weightwise.layers.influence`). The paper removes them; here they are trained
    less often: every period, ``n_active`` layers are drawn without replacement with probability

        p_i proportional to BI_i ** (1 / temperature)

    - proportional to BI at ``temperature=1`` (a layer that changes the states twice as much is
    twice as likely to train), uniform as ``temperature -> inf``, the top-BI layers as it goes to 0.
    A power rather than ``softmax(BI / temperature)``: BI values of LLM layers are small and differ
    by ratios (0.02 against 0.2), which a power keeps at any scale, where a softmax at temperature 1
    would be nearly uniform. BI is floored at 1e-6 so that every layer keeps a chance.

    The measurement is the caller's (:class:`weightwise.layers.callback.LayerwiseSampling` measures
    on the current batch of every rank, reduced over the ranks, before period 0 and before every
    ``refresh_every``-th period: :meth:`wants_influence`, :meth:`record_influence`). Until the first
    measurement the draw is uniform.

    Windows (a documented departure): ShortGPT's ``eval_importance`` cuts every calibration text
    into 256-token windows (``stride=256``), each run as its own forward pass without the tokens
    before it; here each batch row is measured whole, in one forward pass. The two agree for rows of
    at most 256 tokens; on longer rows, the tokens past 256 are measured with their full preceding
    context here (as in training), which the reference's windows do not give them. To measure as
    the reference, pass ``influence_data=`` batches cut into 256-token rows.

    Args:
        num_layers, n_active, seed, pinned: see :class:`LayerPolicy`.
        temperature: the sharpness of the draw (see above).
        refresh_every: periods between measurements (the first is before period 0).

    Raises:
        ValueError: a non-positive ``temperature`` or ``refresh_every < 1``; a measurement of another length.
    """

    name = "block_influence"
    FLOOR = 1e-6

    def __init__(
        self, num_layers: int, n_active: int, seed: int = 0, pinned: Sequence[int] = (), *, temperature: float = 1.0, refresh_every: int = 5
    ) -> None:
        super().__init__(num_layers, n_active, seed, pinned)
        if temperature <= 0 or refresh_every < 1:
            raise ValueError(f"temperature must be positive and refresh_every >= 1, got {temperature}, {refresh_every}")
        self.temperature = temperature
        self.refresh_every = refresh_every
        self.influence: Tensor | None = None
        self.measured_period: int | None = None

    @property
    def importance(self) -> Tensor | None:
        return self.influence

    def wants_influence(self, period: int) -> bool:
        return period % self.refresh_every == 0 and self.measured_period != period

    def record_influence(self, period: int, influence: Tensor) -> None:
        """Take ``period``'s measurement: ``[num_layers]`` BI, already reduced over every rank."""
        if influence.shape != (self.num_layers,):
            raise ValueError(f"block influence of {tuple(influence.shape)} values for a stack of {self.num_layers} layers")
        self.influence = influence.detach().double().cpu().clone()
        self.measured_period = period

    def probabilities(self) -> Tensor:
        """The draw's probabilities over :attr:`candidates` (uniform before any measurement)."""
        if self.influence is None:
            return torch.full((len(self.candidates),), 1.0 / len(self.candidates), dtype=torch.float64)
        weights = self.influence[self.candidates].clamp(min=self.FLOOR) ** (1.0 / self.temperature)
        return weights / weights.sum()

    def draw(self, period: int) -> list[int]:
        return torch.multinomial(self.probabilities(), self.n_active, replacement=False, generator=self.generator(period)).tolist()

    def state_dict(self) -> dict[str, Any]:
        influence = None if self.influence is None else self.influence.clone()
        return {**super().state_dict(), "influence": influence, "measured_period": self.measured_period}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.influence = None if state["influence"] is None else state["influence"].clone()
        self.measured_period = state["measured_period"]
