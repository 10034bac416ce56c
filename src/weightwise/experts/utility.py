"""Which experts deserve more copies: expert utility and the allocation of copies.

"Expert Upcycling" (arXiv 2604.19835; authors' code ``amazon-science/expert-upcycling``,
``expert_upcycling/expert_selector.py``: ``ExpertUsefulnessEvaluator``, ``ExpertSelector.greedy``)
duplicates useful experts more often.

Utility of expert e, from the gradients the optimizer applies (after accumulation, averaged over
ranks), averaged over a window of steps (the reference scores the single step before the surgery,
``utility_window=1``). Metrics (the reference's names):

* ``"gradient_squared"`` ``||g_e||^2`` - the default here (the reference's README recommends a
  gradient-based score; its configuration's default is ``weight_norm``);
* ``"weight_grad_product"`` ``||W_e|| ||g_e||``; ``"weight_norm"`` ``||W_e||``;
* ``"approx_fisher"`` ``sum g_e^2 / (||v_e|| + 1e-8)`` with Adam's second moment ``v``;
* ``"taylor"`` ``sum |W_e * g_e|`` - weightwise 0.1's score (Molchanov et al., 2019);

measured on the expert's ``gate_up`` projection (the reference's ``layer_selection="fc1_only"``),
its ``down`` projection, or ``both`` (the sum of the two).

Allocation of the ``(m - 1) E`` new copies (every expert keeps its own instance):

* ``"greedy"`` (the reference's): each new copy goes to the expert of highest utility that has
  fewer than ``cap`` new copies (3); when every expert is capped the caps restart. So the best
  ``ceil((m - 1) E / cap)`` experts get the copies and the others none.
* ``"proportional"`` (weightwise 0.1's): the new copies in proportion to utility, by the largest
  remainder.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from weightwise.core.checkpoints import state_version, with_version
from weightwise.experts.adapters import ExpertsAdapter

Metric = Literal["gradient_squared", "weight_grad_product", "weight_norm", "approx_fisher", "taylor"]
Projection = Literal["gate_up", "down", "both"]
Allocation = Literal["greedy", "proportional"]
METRICS: tuple[str, ...] = ("gradient_squared", "weight_grad_product", "weight_norm", "approx_fisher", "taylor")
PROJECTIONS = {"gate_up": ("gate_up_proj",), "down": ("down_proj",), "both": ("gate_up_proj", "down_proj")}


def allocate_copies(utility: Tensor, total: int, *, allocation: Allocation = "greedy", cap: int = 3) -> Tensor:
    """Instances per expert after upcycling: ``total`` in all, each expert at least its own.

    Args:
        utility: ``[E]`` utilities.
        total: instances after upcycling (``m E``).
        allocation: ``"greedy"`` (the reference's) or ``"proportional"`` (see the module doc).
        cap: greedy's most new copies per expert before the caps restart (the reference's
            ``max_duplicates_per_expert``, 3).

    Raises:
        ValueError: fewer instances than experts, an unknown allocation or a cap below 1.

    Example::

        >>> import torch
        >>> from weightwise.experts import allocate_copies
        >>> allocate_copies(torch.tensor([0.1, 0.9, 0.5, 0.2]), 8).tolist()  # 4 new copies, at most 3 each
        [1, 4, 2, 1]
    """
    n = utility.numel()
    if total < n:
        raise ValueError(f"cannot give {n} experts at least one copy each with {total} copies")
    utility = utility.detach().double()
    extra = total - n
    if allocation == "greedy":
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        order = torch.argsort(-utility, stable=True).tolist()
        copies, since_restart = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        for _ in range(extra):
            chosen = next((e for e in order if since_restart[e] < cap), None)
            if chosen is None:  # every expert capped: the reference restarts the counts
                since_restart.zero_()
                chosen = order[0]
            since_restart[chosen] += 1
            copies[chosen] += 1
        return copies + 1
    if allocation != "proportional":
        raise ValueError(f"allocation must be 'greedy' or 'proportional', got {allocation!r}")
    utility = utility.clamp(min=0)
    share = utility / utility.sum() * extra if utility.sum() > 0 else torch.full((n,), extra / n, dtype=torch.float64)
    copies = share.floor().long()
    remainder = extra - int(copies.sum())
    if remainder:
        by_remainder = torch.argsort(share - copies, descending=True, stable=True)
        copies[by_remainder[:remainder]] += 1
    return copies + 1


def expert_utility(
    weight: Tensor, grad: Tensor | None, metric: Metric = "gradient_squared", second_moment: Tensor | None = None
) -> Tensor:
    """``[E]`` utilities of the experts of one fused ``[E, ...]`` parameter (see the module doc).

    Raises:
        ValueError: an unknown metric.
    """
    if metric not in METRICS:
        raise ValueError(f"utility metric must be one of {METRICS}, got {metric!r}")
    w = weight.detach().float().flatten(1)
    if metric == "weight_norm":
        return torch.linalg.vector_norm(w, dim=1)
    if grad is None:  # no gradient this step (the expert got no token): the reference scores 0 / the weight norm
        return torch.linalg.vector_norm(w, dim=1) if metric == "weight_grad_product" else torch.zeros(w.shape[0], device=w.device)
    g = grad.detach().float().flatten(1)
    if metric == "gradient_squared":
        return g.square().sum(dim=1)
    if metric == "weight_grad_product":
        return torch.linalg.vector_norm(w, dim=1) * torch.linalg.vector_norm(g, dim=1)
    if metric == "taylor":
        return (w * g).abs().sum(dim=1)
    if second_moment is None:  # approx_fisher without Adam state: the reference falls back to gradient_squared
        return g.square().sum(dim=1)
    return g.square().sum(dim=1) / (torch.linalg.vector_norm(second_moment.detach().float().flatten(1), dim=1) + 1e-8)


class ExpertUtility:
    """Averages per-expert utility over a window of optimizer steps (call :meth:`accumulate` once per step).

    Args:
        blocks: the MoE blocks by name.
        metric: see the module doc.
        projection: ``"gate_up"`` (the reference's), ``"down"`` or ``"both"``.

    Raises:
        ValueError: an unknown metric or projection.
    """

    STATE_VERSION = 1

    def __init__(self, blocks: dict[str, ExpertsAdapter], metric: Metric = "gradient_squared", projection: Projection = "gate_up") -> None:
        if metric not in METRICS:
            raise ValueError(f"utility metric must be one of {METRICS}, got {metric!r}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {sorted(PROJECTIONS)}, got {projection!r}")
        self.blocks = blocks
        self.metric: Metric = metric
        self.projection: Projection = projection
        self.totals = {name: torch.zeros(block.num_experts, dtype=torch.float64) for name, block in blocks.items()}
        self.steps = 0

    @torch.no_grad()
    def accumulate(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Add this step's utilities (call with the gradients the optimizer is about to apply)."""
        for name, block in self.blocks.items():
            params = block.expert_parameters()
            for key in PROJECTIONS[self.projection]:
                param = params[key]
                state = optimizer.state.get(param, {}) if optimizer is not None else {}
                score = expert_utility(param, param.grad, self.metric, state.get("exp_avg_sq"))
                self.totals[name] += score.double().cpu()
        self.steps += 1

    @property
    def averages(self) -> dict[str, Tensor]:
        """Per block, the ``[E]`` utilities averaged over the steps measured."""
        return {name: total / max(self.steps, 1) for name, total in self.totals.items()}

    def state_dict(self) -> dict[str, Any]:
        return with_version(
            {"totals": {k: v.clone() for k, v in self.totals.items()}, "steps": self.steps, "metric": self.metric, "projection": self.projection},
            self.STATE_VERSION,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state_version(state, "ExpertUtility", self.STATE_VERSION) == 0:  # weightwise 0.1: taylor on both projections
            state = {**state, "metric": "taylor", "projection": "both"}
        if (state["metric"], state["projection"]) != (self.metric, self.projection):
            raise ValueError(
                f"the checkpoint measured utility as {state['metric']!r} on {state['projection']!r}, this run as"
                f" {self.metric!r} on {self.projection!r}; resume with utility_metric={state['metric']!r},"
                f" utility_projection={state['projection']!r}"
            )
        self.totals = {k: v.clone() for k, v in state["totals"].items()}
        self.steps = int(state["steps"])
