"""Freezing parameters so that they truly stop changing and stop costing optimizer memory.

Flipping ``requires_grad`` is not enough (docs/architecture.md, "Memory is real"):

* a parameter whose ``.grad`` is a stale tensor still gets a step - with momentum and weight decay
  it keeps moving. PyTorch's optimizers skip parameters whose ``grad is None``, so freezing sets
  ``requires_grad=False`` *and* ``grad=None``: the parameter is then bit-identical until thawed;
* Adam keeps two moment buffers per parameter forever once created. Freezing either drops them
  (``"release"``: memory freed, moments start from zero when the layer returns - what LISA's memory
  claim assumes), moves them to CPU (``"offload"``: accelerator memory freed, moments restored
  when the layer returns), or leaves them where they are (``"keep"``: what LMFlow's LISA and IST's
  reference do; cheap for adapters, and right when layers change every step);
* a frozen layer's weights need not be fp32 on the accelerator: :class:`HostMasters` stores them
  in bf16 there and keeps their fp32 master in host memory, restored when the layer trains again -
  so fp32 weights exist on the accelerator for the active layers only (bf16 halves the frozen
  weights, and under autocast no bf16 copy of them is made for the backward pass either). The
  master is kept, not recomputed: an update smaller than bf16's resolution (2^-8 relative; a period
  at lr 1e-5 moves a weight far less) would otherwise be lost when the layer is frozen again.
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


class HostMasters:
    """Frozen parameters stored in a low precision on their device, their fp32 masters on the host.

    Args:
        dtype: the storage type of frozen parameters (``torch.bfloat16``).
        host: where the fp32 masters wait (``"cpu"``; pinned memory is used when the parameter is on
            a CUDA device, so the copies overlap with compute).

    Raises:
        ValueError: a ``dtype`` that is not a floating point type narrower than fp32.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16, host: torch.device | str = "cpu") -> None:
        if not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
            raise ValueError(f"frozen parameters are stored in a floating type narrower than fp32, got {dtype}")
        self.dtype = dtype
        self.host = torch.device(host)
        self.masters: dict[nn.Parameter, Tensor] = {}

    def freeze(self, params: Iterable[nn.Parameter]) -> None:
        """Park each parameter's fp32 value on the host and store it in :attr:`dtype` (idempotent)."""
        for p in params:
            if p in self.masters or p.dtype != torch.float32:
                continue
            pin = p.device.type == "cuda" and self.host.type == "cpu"
            master = torch.empty(p.shape, dtype=torch.float32, device=self.host, pin_memory=pin)
            master.copy_(p.detach(), non_blocking=pin)
            self.masters[p] = master
            p.data = p.data.to(self.dtype)

    def thaw(self, params: Iterable[nn.Parameter]) -> None:
        """Give each parked parameter its fp32 master back."""
        for p in params:
            master = self.masters.pop(p, None)
            if master is not None:
                p.data = master.to(p.device, non_blocking=master.is_pinned())

    def state_dict(self, names: Mapping[nn.Parameter, str]) -> dict[str, Tensor]:
        """The parked masters by parameter name (the model's own state holds their low-precision copies)."""
        return {names[p]: master.cpu() for p, master in self.masters.items()}

    def load_state_dict(self, state: Mapping[str, Tensor], params: Mapping[str, nn.Parameter]) -> None:
        """Put the fp32 values of a checkpoint back into the named parameters (fp32 again; the next
        :meth:`freeze` parks them anew).

        Raises:
            ValueError: names the model lacks, or shapes that differ.
        """
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"the checkpoint parks fp32 weights for parameters this model lacks: {unknown[:5]}")
        for name, master in state.items():
            param = params[name]
            if master.shape != param.shape:
                raise ValueError(f"parked weight {name!r} has shape {tuple(master.shape)}, the parameter {tuple(param.shape)}")
            self.masters.pop(param, None)
            param.data = master.to(param.device, torch.float32)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds in the optimizer's per-parameter state tensors (e.g. Adam's two
    moments); of a DTensor (FSDP2's sharded state), its local shard."""
    tensors = (v.to_local() if hasattr(v, "to_local") else v for s in optimizer.state.values() for v in s.values())
    return sum(v.numel() * v.element_size() for v in tensors if isinstance(v, Tensor))


def activate_layers(
    layer_params: Sequence[Sequence[nn.Parameter]],
    chosen: Iterable[int],
    optimizer: torch.optim.Optimizer | None,
    stash: OptimizerStateStash,
    masters: HostMasters | None = None,
) -> None:
    """Make exactly the ``chosen`` layers trainable: freeze the others (state released or parked by
    ``stash``; with ``masters``, weights stored in low precision and fp32 parked on the host) and
    thaw the chosen ones (parked state and fp32 weights restored).

    Args:
        layer_params: per layer of the stack, the parameters that layer sampling may train.
        chosen: indices of the layers to train.
        optimizer: the optimizer whose per-parameter state follows the freezing (``None``: none yet).
        stash: where frozen layers' state goes.
        masters: where frozen layers' fp32 weights go (``None``: they stay fp32 on the device).
    """
    chosen = set(chosen)
    frozen = [p for i, params in enumerate(layer_params) if i not in chosen for p in params]
    thawed = [p for i in sorted(chosen) for p in layer_params[i]]
    stash.freeze(frozen, optimizer)
    if masters is not None:
        masters.freeze(frozen)
        masters.thaw(thawed)
    stash.thaw(thawed, optimizer)
