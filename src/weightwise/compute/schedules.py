"""Learning-rate schedules over a compute budget: a function of the *spent fraction*, not of the step.

Pruning and selection change how many optimizer steps a budget buys (a pruned epoch is shorter,
a selected step backpropagates fewer rows), so a schedule sized in steps -
``trainer.estimated_stepping_batches`` counts full epochs - ends early or late. These schedules read
how much of the budget is spent (:attr:`weightwise.compute.ComputeBudget.fraction`, the same on
every rank and restored on resume) and so end exactly at the budget, whatever a step costs.

* ``"cosine"``: linear warm-up, then a half cosine to ``final_lr_fraction`` (Loshchilov & Hutter,
  SGDR, ICLR 2017; the shape of ``transformers.get_cosine_schedule_with_warmup``).
* ``"linear"``: linear warm-up, then a straight line to ``final_lr_fraction``.
* ``"wsd"``: warm-up, stable at the peak, and a linear decay over the last ``decay_fraction`` of the
  budget (warmup-stable-decay: Hu et al., MiniCPM, 2024; Hägele et al., "Scaling Laws and
  Compute-Optimal Training Beyond Fixed Training Durations", NeurIPS 2024, who decay over the last
  10-20%).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, Protocol

Kind = Literal["cosine", "linear", "wsd"]


class HasFraction(Protocol):
    """Anything with a spent fraction in [0, 1] (a :class:`~weightwise.compute.ComputeBudget`)."""

    @property
    def fraction(self) -> float: ...


def lr_factor(
    fraction: float,
    kind: Kind = "cosine",
    *,
    warmup_fraction: float = 0.0,
    final_lr_fraction: float = 0.0,
    decay_fraction: float = 0.2,
) -> float:
    """The learning-rate multiplier when ``fraction`` of the budget is spent.

    It rises linearly from 0 over ``[0, warmup_fraction)`` and reaches ``final_lr_fraction`` at
    ``fraction >= 1`` (and stays there).

    Raises:
        ValueError: an unknown kind, or fractions outside their ranges.

    Example::

        >>> from weightwise.compute import lr_factor
        >>> lr_factor(0.5, "cosine"), lr_factor(1.0, "cosine", final_lr_fraction=0.1)
        (0.5, 0.1)
    """
    if kind not in ("cosine", "linear", "wsd"):
        raise ValueError(f"kind must be 'cosine', 'linear' or 'wsd', got {kind!r}")
    if not 0.0 <= warmup_fraction < 1.0 or not 0.0 <= final_lr_fraction <= 1.0 or not 0.0 < decay_fraction <= 1.0:
        raise ValueError(
            "need 0 <= warmup_fraction < 1, 0 <= final_lr_fraction <= 1 and 0 < decay_fraction <= 1, got"
            f" warmup_fraction={warmup_fraction}, final_lr_fraction={final_lr_fraction}, decay_fraction={decay_fraction}"
        )
    if kind == "wsd" and decay_fraction > 1.0 - warmup_fraction:
        raise ValueError(f"the decay ({decay_fraction}) and the warm-up ({warmup_fraction}) overlap: their sum must be at most 1")
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction < warmup_fraction:
        return fraction / warmup_fraction
    if kind == "wsd":
        decay_start = 1.0 - decay_fraction
        progress = max(0.0, (fraction - decay_start) / decay_fraction)
        return 1.0 - (1.0 - final_lr_fraction) * progress
    progress = (fraction - warmup_fraction) / (1.0 - warmup_fraction)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return final_lr_fraction + (1.0 - final_lr_fraction) * shape


def budget_lr_lambda(
    budget: HasFraction,
    kind: Kind = "cosine",
    *,
    warmup_fraction: float = 0.0,
    final_lr_fraction: float = 0.0,
    decay_fraction: float = 0.2,
) -> Callable[[int], float]:
    """An ``lr_lambda`` for ``torch.optim.lr_scheduler.LambdaLR`` that follows ``budget``'s spent fraction.

    The step count LambdaLR passes is ignored; step the scheduler every optimizer step
    (``"interval": "step"``). ComputeBudget sums the spending over ranks just before each optimizer
    step, so the learning rate the scheduler sets after step n follows the budget spent by step n,
    and the last step (the one that spends the budget) leaves it at ``final_lr_fraction``. The
    returned function is a plain function, so LambdaLR's state dict (and the checkpoint) holds no
    copy of the budget; resuming restores the spent fraction from ComputeBudget's own state.

    Raises:
        ValueError: see :func:`lr_factor`.

    Example::

        >>> import torch
        >>> from weightwise.compute import ComputeBudget, budget_lr_lambda
        >>> budget = ComputeBudget(flops=1e12)
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        >>> schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, budget_lr_lambda(budget, "wsd", warmup_fraction=0.1))
        >>> optimizer.param_groups[0]["lr"]  # nothing spent yet: the warm-up starts at 0
        0.0
    """
    lr_factor(0.0, kind, warmup_fraction=warmup_fraction, final_lr_fraction=final_lr_fraction, decay_fraction=decay_fraction)

    def lr_lambda(step: int) -> float:
        return lr_factor(
            budget.fraction, kind, warmup_fraction=warmup_fraction, final_lr_fraction=final_lr_fraction, decay_fraction=decay_fraction
        )

    return lr_lambda
