"""The private pieces of ``torch`` weightwise touches (tested with torch 2.2-2.13; FSDP2's from 2.4).

* ``torch.optim.lr_scheduler.LRScheduler`` warns "Detected call of ``lr_scheduler.step()`` before
  ``optimizer.step()``" unless the optimizer it drives carries ``_opt_called`` (set by the wrapper
  it puts around ``optimizer.step``). Under DeepSpeed with layer sampling, the scheduler drives the
  user's optimizer while the parameters are stepped through a rebuilt ZeRO optimizer
  (:mod:`weightwise.integrations.deepspeed`), so the flag is set by hand (:func:`mark_stepped`).
* FSDP2 (``fully_shard``) decides each parameter group's gradient dtypes once, at its lazy init
  (the root's first forward), from the parameters that require grad then
  (``FSDPParamGroup._init_mp_dtypes``, reached through ``FSDPModule._get_fsdp_state()``): a layer
  frozen at that moment gets none, and under a ``MixedPrecisionPolicy`` its bf16 gradients are not
  cast back when it trains again (torch 2.13: "attempting to assign a gradient with dtype BFloat16
  to a tensor with grad_dtype Float"). :func:`refresh_fsdp2_dtypes` recomputes them after layer
  sampling changed what trains.
* ``FlopCounterMode`` has no formula for ``aten._grouped_mm`` (torch 2.13), the product transformers 5
  runs a Mixture-of-Experts' experts with by default (``config._experts_implementation="grouped_mm"``):
  the experts' FLOPs would count as zero. :data:`EXTRA_FLOP_FORMULAS` gives it one, passed to
  ``FlopCounterMode(custom_mapping=...)`` by :mod:`weightwise.compute` (nothing is registered globally).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from weightwise.integrations.versions import require


def mark_stepped(optimizer: torch.optim.Optimizer) -> None:
    """Tell LR schedulers that ``optimizer``'s parameters were stepped (by another optimizer)."""
    optimizer._opt_called = True  # type: ignore[attr-defined]


def _fsdp2_param_groups(module: torch.nn.Module) -> Iterator[Any]:
    """The FSDP2 parameter groups of every ``fully_shard``-ed module inside ``module``."""
    for submodule in module.modules():
        get_state = getattr(submodule, "_get_fsdp_state", None)
        if get_state is None:
            continue
        state = get_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.10: one group per module
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        yield from groups


FSDP2_MINIMUM = "2.4"
FSDP2_TESTED = ">=2.4,<2.14"


def check_fsdp2(module: torch.nn.Module) -> None:
    """Raise, naming the versions, if this torch lacks the FSDP2 pieces :func:`refresh_fsdp2_dtypes`
    reaches in ``module`` (probed when a fit starts, not mid-run).

    Raises:
        UnsupportedVersionError: torch older than 2.4, or a piece missing.
    """
    require("torch", FSDP2_MINIMUM, FSDP2_TESTED, missing_fsdp2_pieces(module), purpose="LayerwiseSampling under ModelParallelStrategy")


def missing_fsdp2_pieces(module: torch.nn.Module) -> list[str]:
    """The private FSDP2 pieces :func:`refresh_fsdp2_dtypes` needs that this torch lacks (none: ``[]``)."""
    groups = list(_fsdp2_param_groups(module))
    if not groups:
        return ["FSDPModule._get_fsdp_state() and its parameter groups"] if _is_fsdp2(module) else []
    return [] if all(callable(getattr(g, "_init_mp_dtypes", None)) for g in groups) else ["FSDPParamGroup._init_mp_dtypes"]


def _is_fsdp2(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def refresh_fsdp2_dtypes(module: torch.nn.Module) -> None:
    """Recompute the gradient dtypes of every FSDP2 parameter group in ``module`` from the parameters
    that require grad now (groups not yet lazily initialised are left to their lazy init, which does it)."""
    for group in _fsdp2_param_groups(module):
        if hasattr(group, "_orig_dtype"):  # set by the lazy init (the class only annotates it)
            group._init_mp_dtypes()


def grouped_mm_flops(a_shape: torch.Size, b_shape: torch.Size, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``torch._grouped_mm(a, b, offs)``: 2 x the multiply-adds of its groups, for every layout.

    2-D x 3-D (``a [ΣM, K]``, ``b [G, K, N]``, groups along M) and 3-D x 3-D: ``2 · a.numel() · N``;
    2-D x 2-D (``a [M, ΣK]``, ``b [ΣK, N]``, groups along K, the weights' gradient): the same;
    3-D x 2-D (``a [G, M, K]``, ``b [K, ΣN]``, groups along N): ``2 · b.numel() · M``. Rows past the
    last offset (padding) are counted as computed.
    """
    if len(a_shape) == 3 and len(b_shape) == 2:
        return 2 * b_shape.numel() * a_shape[-2]
    return 2 * a_shape.numel() * b_shape[-1]


EXTRA_FLOP_FORMULAS: dict[Any, Any] = (
    {torch.ops.aten._grouped_mm: grouped_mm_flops} if hasattr(torch.ops.aten, "_grouped_mm") else {}
)
"""Formulas ``FlopCounterMode`` lacks, keyed by aten operator (empty on a torch without the op)."""
