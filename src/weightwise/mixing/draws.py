"""Drawing one batch's domains by the mixture, shared by the map-style sampler and the stream.

Batch ``k`` on rank ``r`` draws from a generator seeded by ``(seed, r, k)``: the same weights on
every rank, different draws per rank, and the same draws again after a resume (counter-based
randomness, no generator state to carry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

Exhausted = Literal["restart", "drop", "stop"]
Draw = Literal["sample", "batch"]
EXHAUSTED_POLICIES = ("restart", "drop", "stop")
DOMAIN_KEY = "domain_id"
"""The batch key under which each sample's domain id travels."""

EMPTY = object()
"""What a source's ``take(d)`` returns when domain ``d`` has no more items (under ``"drop"``/``"stop"``)."""


def check_options(exhausted: str, draw: str, batch_size: int) -> None:
    """Raises ValueError for an unknown exhausted-domain policy or draw, or a non-positive batch size."""
    if exhausted not in EXHAUSTED_POLICIES:
        raise ValueError(f"exhausted must be one of {EXHAUSTED_POLICIES}, got {exhausted!r}")
    if draw not in ("sample", "batch"):
        raise ValueError(
            f"draw must be 'sample' (each sample's domain drawn) or 'batch' (one domain per micro-batch), got {draw!r}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def batch_generator(seed: int, rank: int, batch: int) -> torch.Generator:
    """The generator of batch ``batch`` on rank ``rank`` (a hash of the three; Python hashes ints stably)."""
    return torch.Generator().manual_seed(hash((seed, rank, batch)) & 0x7FFF_FFFF_FFFF_FFFF)


def fill_batch(
    weights: Tensor,
    dropped: Tensor,
    size: int,
    generator: torch.Generator,
    draw: Draw,
    exhausted: Exhausted,
    take: Callable[[int], Any],
) -> tuple[list[tuple[int, Any]], bool]:
    """Draw ``size`` (domain, item) pairs; ``take(d)`` gives domain ``d``'s next item or :data:`EMPTY`.

    Returns the pairs and whether the source ends here. Under ``"drop"`` an empty domain is marked
    in ``dropped`` (in place) and the slots still to fill are drawn again over the rest,
    renormalised; under ``"stop"`` the first empty domain ends the source (the pairs drawn so far
    are its last, short batch). ``"restart"`` is the source's business: its ``take`` starts the
    domain over.

    Raises:
        RuntimeError: every domain is exhausted.
    """
    batch: list[tuple[int, Any]] = []
    while len(batch) < size:
        available = torch.where(dropped, torch.zeros_like(weights), weights)
        if float(available.sum()) <= 0:
            raise RuntimeError("every domain with a positive weight is exhausted; use exhausted='restart' or more data")
        todo = size - len(batch)
        domains = torch.multinomial(available, 1 if draw == "batch" else todo, replacement=True, generator=generator)
        domains = domains.expand(todo) if draw == "batch" else domains
        for d in domains.tolist():
            item = take(d)
            if item is EMPTY:
                if exhausted == "stop":
                    return batch, True
                dropped[d] = True
                break
            batch.append((d, item))
    return batch, False
