"""How weightwise sees a Mixture-of-Experts block: a router and a stack of experts.

Upcycling needs four things of a block: its router weight ``[E, H]`` (one row of logits per
expert), whether top-K weights are renormalised, its expert tensors, and how to rebuild them from
a list of source experts or by splitting each expert's hidden (intermediate) units. The
:class:`ExpertsAdapter` interface says exactly that; :class:`FusedExpertsAdapter` implements it
for the transformers 5.x families that store experts fused as 3-D parameters (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE): ``experts.gate_up_proj [E, 2I, H]`` (gate rows then up rows),
``experts.down_proj [E, H, I]`` and ``gate.weight [E, H]``. Other MoE code plugs in by
subclassing :class:`ExpertsAdapter`.

Parameters are changed *in place* (``param.data = ...``): the ``nn.Parameter`` objects survive
surgery, so an optimizer built on them stays valid and only its per-parameter state is resized
(:mod:`weightwise.experts.surgery`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class ExpertsAdapter(ABC):
    """One MoE block, as upcycling needs it."""

    block: nn.Module

    @property
    @abstractmethod
    def num_experts(self) -> int: ...

    @property
    @abstractmethod
    def top_k(self) -> int: ...

    @property
    @abstractmethod
    def renormalizes(self) -> bool:
        """Whether the selected top-K probabilities are divided by their sum."""

    @property
    @abstractmethod
    def intermediate_size(self) -> int: ...

    @property
    @abstractmethod
    def router_weight(self) -> nn.Parameter:
        """``[E, H]``: router logits are ``hidden @ router_weight.T``."""

    @property
    def router_bias(self) -> nn.Parameter | None:
        """``[E]`` router bias, where the router has one (added to the logits); ``None`` otherwise."""
        return None

    @abstractmethod
    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """The experts' parameters by name, each with the expert index on dim 0."""

    @abstractmethod
    def gather_experts(self, tensors: dict[str, Tensor], sources: Tensor, output_scale: float) -> dict[str, Tensor]:
        """From tensors laid out like :meth:`expert_parameters` (the weights, or optimizer state of
        the same shapes): expert j becomes a copy of ``sources[j]``, its output scaled by ``output_scale``."""

    @abstractmethod
    def split_experts(self, tensors: dict[str, Tensor], parts: int, output_scale: float) -> dict[str, Tensor]:
        """Likewise: expert ``e * parts + s`` is slice s of expert e's hidden units, output scaled."""

    @abstractmethod
    def set_routing(self, num_experts: int, top_k: int, intermediate_size: int) -> None:
        """Update the block's own bookkeeping (counts it reads in ``forward``)."""


class FusedExpertsAdapter(ExpertsAdapter):
    """transformers 5.x fused experts: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (shared experts untouched)."""

    def __init__(self, block: nn.Module) -> None:
        if not self.matches(block):
            raise TypeError(f"{type(block).__name__} is not a fused-experts MoE block (gate.weight + experts.gate_up_proj)")
        self.block = block

    @staticmethod
    def matches(module: nn.Module) -> bool:
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        return (
            isinstance(getattr(gate, "weight", None), nn.Parameter)
            and gate.weight.ndim == 2
            and isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter)
            and isinstance(getattr(experts, "down_proj", None), nn.Parameter)
        )

    @property
    def num_experts(self) -> int:
        return self.block.experts.gate_up_proj.shape[0]

    @property
    def top_k(self) -> int:
        return int(self.block.gate.top_k)

    @property
    def renormalizes(self) -> bool:
        # Mixtral's router always renormalises; the others follow config.norm_topk_prob.
        return bool(getattr(self.block.gate, "norm_topk_prob", True))

    @property
    def intermediate_size(self) -> int:
        return self.block.experts.down_proj.shape[-1]

    @property
    def router_weight(self) -> nn.Parameter:
        return self.block.gate.weight

    @property
    def router_bias(self) -> nn.Parameter | None:
        bias = getattr(self.block.gate, "bias", None)
        return bias if isinstance(bias, nn.Parameter) else None

    def expert_parameters(self) -> dict[str, nn.Parameter]:
        return {"gate_up_proj": self.block.experts.gate_up_proj, "down_proj": self.block.experts.down_proj}

    def gather_experts(self, tensors: dict[str, Tensor], sources: Tensor, output_scale: float) -> dict[str, Tensor]:
        sources = sources.to(tensors["down_proj"].device)
        down = tensors["down_proj"][sources]  # advanced indexing copies: scale the copy in place
        return {"gate_up_proj": tensors["gate_up_proj"][sources], "down_proj": down.mul_(output_scale) if output_scale != 1.0 else down}

    def split_experts(self, tensors: dict[str, Tensor], parts: int, output_scale: float) -> dict[str, Tensor]:
        gate_up, down = tensors["gate_up_proj"], tensors["down_proj"]  # [E, 2I, H], [E, H, I]
        n, inter = down.shape[0], down.shape[-1]
        if inter % parts:
            raise ValueError(f"intermediate size {inter} is not divisible into {parts} slices")
        width = inter // parts
        gate, up = gate_up.split(inter, dim=1)  # [E, I, H] each: gate rows, then up rows
        gate = gate.reshape(n * parts, width, -1)
        up = up.reshape(n * parts, width, -1)
        down = down.reshape(n, -1, parts, width).permute(0, 2, 1, 3).reshape(n * parts, -1, width) * output_scale
        return {"gate_up_proj": torch.cat([gate, up], dim=1).contiguous(), "down_proj": down.contiguous()}

    def set_routing(self, num_experts: int, top_k: int, intermediate_size: int) -> None:
        block, gate, experts = self.block, self.block.gate, self.block.experts
        gate.num_experts = experts.num_experts = num_experts
        gate.top_k = top_k
        if hasattr(block, "top_k"):
            block.top_k = top_k
        if hasattr(block, "num_experts"):
            block.num_experts = num_experts
        experts.intermediate_dim = intermediate_size


def find_moe_blocks(model: nn.Module) -> dict[str, ExpertsAdapter]:
    """Every fused-experts MoE block of a model, by module name (raises if there is none)."""
    blocks = {name: FusedExpertsAdapter(m) for name, m in model.named_modules() if FusedExpertsAdapter.matches(m)}
    if not blocks:
        raise ValueError(
            f"found no MoE block in {type(model).__name__}: weightwise recognises transformers' fused experts"
            " (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE); for other MoE code call upcycle_experts(model, factor,"
            " adapters={'block.name': YourAdapter(block)}) with an implementation of weightwise.experts.ExpertsAdapter"
        )
    return blocks
