"""Freezing parameters so that they truly stop changing and stop costing optimizer memory.

Flipping ``requires_grad`` is not enough (docs/architecture.md, "Memory is real"):

* a parameter whose ``.grad`` is a stale tensor still gets a step - with momentum and weight decay
  it keeps moving. PyTorch's optimizers skip parameters whose ``grad is None``, so freezing sets
  ``requires_grad=False`` *and* ``grad=None``: the parameter is then bit-identical until thawed;
* Adam keeps two moment buffers per parameter forever once created. Freezing either drops them
  (``"release"``: memory freed, moments start from zero when the layer returns - what LISA's memory
  claim assumes), moves them to CPU (``"offload"``: accelerator memory freed, moments restored
  when the layer returns), or leaves them where they are (``"keep"``: what LMFlow's LISA and IST's
  reference do; cheap for adapters, and right when layers change every step).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

StateMode = Literal["release", "offload", "keep"]


class OptimizerStateStash:
    """Frozen parameters' optimizer state, released, parked on CPU or kept.

    Raises:
        ValueError: an unknown mode.
    """

    def __init__(self, mode: StateMode = "release") -> None:
        if mode not in ("release", "offload", "keep"):
            raise ValueError(f"optimizer state mode must be 'release', 'offload' or 'keep', got {mode!r}")
        self.mode = mode
        self.parked: dict[nn.Parameter, dict[str, object]] = {}

    def freeze(self, params: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer | None) -> None:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
            if self.mode == "keep":
                continue
            state = optimizer.state.pop(p, None) if optimizer is not None else None
            if state and self.mode == "offload":
                self.parked[p] = {k: v.to("cpu", copy=True) if isinstance(v, Tensor) else v for k, v in state.items()}

    def thaw(self, params: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer | None) -> None:
        for p in params:
            p.requires_grad_(True)
            parked = self.parked.pop(p, None)
            if parked is not None and optimizer is not None:
                # Per-element state goes back to the parameter's device; a scalar ``step`` too only for
                # capturable/fused optimizers - the others keep it on CPU (no host sync per step).
                scalars_on_device = bool(optimizer.defaults.get("capturable") or optimizer.defaults.get("fused"))
                optimizer.state[p] = {
                    k: v.to(p.device) if isinstance(v, Tensor) and (v.dim() > 0 or scalars_on_device) else v
                    for k, v in parked.items()
                }

    def state_dict(self, names: Mapping[nn.Parameter, str]) -> dict[str, dict[str, object]]:
        """The parked state keyed by parameter name, for checkpoints (its tensors are on CPU)."""
        unnamed = [tuple(p.shape) for p in self.parked if p not in names]
        if unnamed:
            raise RuntimeError(
                f"optimizer state is parked for {len(unnamed)} parameters the module no longer has (shapes {unnamed[:3]});"
                " parameters were replaced after fit started - freeze with optimizer_state='release' instead"
            )
        return {names[p]: state for p, state in self.parked.items()}

    def load_state_dict(self, state: Mapping[str, dict[str, object]], params: Mapping[str, nn.Parameter]) -> None:
        """Park ``state`` (from :meth:`state_dict`) again for the parameters of those names."""
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"the checkpoint parks optimizer state for parameters this model lacks: {unknown[:5]}")
        for name, s in state.items():
            mismatched = [k for k, v in s.items() if isinstance(v, Tensor) and v.dim() > 0 and v.shape != params[name].shape]
            if mismatched:
                raise ValueError(f"parked state {mismatched} of {name!r} does not match its shape {tuple(params[name].shape)}")
        self.parked = {params[name]: dict(s) for name, s in state.items()}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state tensors (e.g. Adam's two moments)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor))


def activate_layers(
    layer_params: Sequence[Sequence[nn.Parameter]],
    chosen: Iterable[int],
    optimizer: torch.optim.Optimizer | None,
    stash: OptimizerStateStash,
) -> None:
    """Make exactly the ``chosen`` layers trainable: freeze the others (state released or parked by
    ``stash``) and thaw the chosen ones (parked state restored).

    Args:
        layer_params: per layer of the stack, the parameters that layer sampling may train.
        chosen: indices of the layers to train.
        optimizer: the optimizer whose per-parameter state follows the freezing (``None``: none yet).
        stash: where frozen layers' state goes.
    """
    chosen = set(chosen)
    stash.freeze((p for i, params in enumerate(layer_params) if i not in chosen for p in params), optimizer)
    stash.thaw((p for i in sorted(chosen) for p in layer_params[i]), optimizer)
