"""The one private piece of ``torch.optim`` weightwise sets (tested with torch 2.2-2.13).

``torch.optim.lr_scheduler.LRScheduler`` warns "Detected call of ``lr_scheduler.step()`` before
``optimizer.step()``" unless the optimizer it drives carries ``_opt_called`` (set by the wrapper
it puts around ``optimizer.step``). Under DeepSpeed with layer sampling, the scheduler drives the
user's optimizer while the parameters are stepped through a rebuilt ZeRO optimizer
(:mod:`weightwise.integrations.deepspeed`), so the flag is set by hand.
"""

from __future__ import annotations

import torch


def mark_stepped(optimizer: torch.optim.Optimizer) -> None:
    """Tell LR schedulers that ``optimizer``'s parameters were stepped (by another optimizer)."""
    optimizer._opt_called = True  # type: ignore[attr-defined]
