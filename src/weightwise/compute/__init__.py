"""Compute accounting: the FLOPs and tokens a run spends, and training to a compute budget.

* :class:`ComputeMeter` - counts every forward and backward (functional core, any loop);
  :func:`spending` names the source of an extra pass; :class:`Spent` holds the counts.
* :class:`ComputeBudget` - the Lightning callback that stops the fit when the budget is spent.
* :func:`budget_lr_lambda`, :func:`lr_factor` - learning-rate schedules that end at the budget;
  :func:`find_budget` finds the budget from a ``configure_optimizers``.
"""

from weightwise.compute.callback import ComputeBudget, find_budget
from weightwise.compute.meter import SOURCES, ComputeMeter, Spent, count_tokens, spending
from weightwise.compute.schedules import budget_lr_lambda, lr_factor

__all__ = [
    "SOURCES",
    "ComputeBudget",
    "ComputeMeter",
    "Spent",
    "budget_lr_lambda",
    "count_tokens",
    "find_budget",
    "lr_factor",
    "spending",
]
