"""Selecting samples by rank in O(N): no full sort of N scores (10M scores sort in >1 s on a CPU)."""

from __future__ import annotations

import torch
from torch import Tensor


def rank_range(scores: Tensor, start: int, stop: int) -> Tensor:
    """Ids of the samples ranked ``start .. stop-1`` by descending score, ties by ascending id.

    Uses two ``kthvalue`` selections (linear time) for the boundary values, then resolves ties
    at the boundaries by id, so the result is exactly that of a stable descending sort.
    ``nan`` ranks first (unscored samples count as the hardest).
    """
    n = scores.numel()
    if not 0 <= start < stop <= n:
        raise ValueError(f"rank range [{start}, {stop}) outside [0, {n}]")
    keys = torch.nan_to_num(scores.double(), nan=float("inf"))
    # descending rank r is ascending position n - 1 - r (kthvalue is 1-based)
    upper = torch.kthvalue(keys, n - start).values  # value at rank start
    lower = torch.kthvalue(keys, n - stop + 1).values  # value at rank stop - 1
    selected = (keys < upper) & (keys > lower)
    for boundary in {float(upper), float(lower)}:
        equal = keys == boundary
        ranks = (keys > boundary).sum() + torch.cumsum(equal, 0) - 1
        selected |= equal & (ranks >= start) & (ranks < stop)
    return selected.nonzero().squeeze(1)

