"""Which experts deserve more copies: gradient-based utility and the allocation rule.

"Expert Upcycling" (2026) duplicates useful experts more often ("utility-based expert
selection"). weightwise measures an expert's utility as the first-order Taylor estimate of the
loss change if the expert were removed, accumulated over a window of batches:

    u_e = sum over steps, sum over the expert's parameters theta of |theta * dL/dtheta|

(the magnitude of ``theta . grad``, the classic importance score of Molchanov et al., 2019,
applied to each expert's slice of the fused ``[E, ...]`` tensors).

Allocation: every expert keeps at least one copy, and the ``(m - 1) E`` extra copies are shared in
proportion to utility by the largest-remainder (Hamilton) method, so copies sum to exactly ``m E``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from weightwise.experts.adapters import ExpertsAdapter


def allocate_copies(utility: Tensor, total: int) -> Tensor:
    """Copies per expert: at least 1 each, ``total`` in all, the rest in proportion to ``utility``."""
    n = utility.numel()
    if total < n:
        raise ValueError(f"cannot give {n} experts at least one copy each with {total} copies")
    utility = utility.detach().double().clamp(min=0)
    extra = total - n
    share = utility / utility.sum() * extra if utility.sum() > 0 else torch.full((n,), extra / n, dtype=torch.float64)
    copies = share.floor().long()
    remainder = extra - int(copies.sum())
    if remainder:
        order = torch.argsort(share - copies, descending=True, stable=True)
        copies[order[:remainder]] += 1
    return copies + 1


class ExpertUtility:
    """Accumulates ``|theta * grad|`` per expert over a window of backward passes."""

    def __init__(self, blocks: dict[str, ExpertsAdapter]) -> None:
        self.blocks = blocks
        self.totals = {name: torch.zeros(block.num_experts, dtype=torch.float64) for name, block in blocks.items()}
        self.steps = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the current gradients' contribution (call after ``backward``, before ``zero_grad``)."""
        for name, block in self.blocks.items():
            for param in block.expert_parameters().values():
                if param.grad is not None:
                    score = (param.detach() * param.grad).abs().flatten(1).sum(dim=1)
                    self.totals[name] += score.double().cpu()
        self.steps += 1

    def state_dict(self) -> dict:
        return {"totals": {k: v.clone() for k, v in self.totals.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.totals = {k: v.clone() for k, v in state["totals"].items()}
        self.steps = int(state["steps"])
