"""Grow a Mixture-of-Experts from E to m·E experts, preserving what it computes.

Two operators, both keep the per-token compute of the model:

``method="duplicate"`` (top-K fixed; "Expert Upcycling", arXiv 2604.19835, authors' code
``amazon-science/expert-upcycling``, ``expert_upcycling/router_upcycler.py`` and
``optimizer_utils.py``): expert j of the new block is a copy of a source expert (``m`` copies
each, or per-expert counts from utility, :mod:`weightwise.experts.utility`); each copy's router
row (and bias) is its source's, so every copy gets its source's logit.

* Top-1 routing with renormalisation (Mixtral): the top copy belongs to the top source, its
  weight is 1, copies are identical - the output is unchanged exactly.
* Without renormalisation (Qwen-MoE/OLMoE ``norm_topk_prob=False``) a copy's probability is its
  source's divided by the (probability-weighted) number of copies; copies' outputs are scaled by
  ``m`` to compensate - exact for top-1 with uniform duplication. The reference copies unscaled
  (``preserve_function=False``), which changes the function of such routers at the surgery.
* Top-K > 1 cannot be preserved: copies of the best expert tie, and top-K then picks K copies
  of one source instead of K distinct experts. No router extension avoids this without a bias;
  :func:`upcycle_experts` reports it and the loss jump must be measured (the callback logs it).
* Identical copies with identical router rows tie forever (top-K always takes the first copy and
  the others never train): ``router_noise`` adds Gaussian noise of that relative size to the
  copies' router rows - or, as the reference, to their router bias (``noise_target="bias"``; the
  transformers routers weightwise adapts have none) - which splits each source's tokens among
  its copies; it changes outputs only for tokens whose best sources are within the noise of each
  other.

``method="granular"`` (exact for any K): each expert's hidden units are split into ``m`` slices of
``I/m`` units, each slice a new expert with its parent's router row, and top-K becomes top-(m·K).
The m slices of an expert tie and are selected together, each with weight ``w/m``; their outputs
are scaled by ``m``, and since the expert's output is a sum over its hidden units, the block's
output is unchanged up to float rounding. FLOPs per token are unchanged (m·K experts of I/m).

Surgery is in place and keeps the ``nn.Parameter`` objects: pass the ``optimizer`` and its
per-parameter state (Adam moments, momentum) is remapped to the new experts - a copy inherits its
source's state, scaled like the copy's *gradient*. A weight scaled by s (the output scale above)
receives gradients scaled by 1/s (its routing probability is 1/s of its source's), so its first
moments are divided by s and its second moments by s^2: the state is what the optimizer would hold
had it always trained the new parametrisation, and Adam's next step of each copy is the step its
source would have taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from weightwise.experts.adapters import ExpertsAdapter, find_moe_blocks
from weightwise.experts.utility import Allocation, allocate_copies

Method = Literal["duplicate", "granular"]
Selection = Literal["uniform", "utility"]


@dataclass
class UpcycleReport:
    """What :func:`upcycle_experts` did, per block name."""

    method: str
    factor: int
    num_experts: tuple[int, int]  # before, after
    top_k: tuple[int, int]
    exact: bool  # whether the operator preserves the function exactly (up to float rounding)
    sources: dict[str, Tensor] = field(default_factory=dict)  # new expert -> source expert
    copies: dict[str, Tensor] = field(default_factory=dict)  # source expert -> number of copies


def _remap_state(optimizer: torch.optim.Optimizer | None, param: nn.Parameter, transform: Callable[[Tensor, int], Tensor]) -> None:
    """Apply ``transform(tensor, power)`` to every state tensor shaped like ``param``.

    power is 1 for first moments / momentum and 2 for second moments (``*_sq``)."""
    if optimizer is None or param not in optimizer.state:
        return
    state = optimizer.state[param]
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == param.shape:
            state[key] = transform(value, 2 if key.endswith("_sq") else 1)


def _replace(param: nn.Parameter, new: Tensor) -> None:
    param.data = new.to(dtype=param.dtype, device=param.device).contiguous()
    param.grad = None


def _update_config(model: nn.Module, old: tuple[int, int, int], new: tuple[int, int, int]) -> None:
    old_e, old_k, old_i = old
    new_e, new_k, new_i = new
    from transformers import (
        PretrainedConfig,  # lazily: weightwise imports transformers only where it uses it
    )

    configs = {id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)}
    for config in configs.values():  # the model's own, or those of transformers models inside a wrapper
        config.num_experts = new_e  # transformers maps this to num_local_experts where that is the name
        config.num_experts_per_tok = new_k
        if new_i != old_i:
            name = "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"
            setattr(config, name, new_i)
    for module in model.modules():  # e.g. *ForCausalLM.num_experts, read by the load-balancing loss
        if getattr(module, "num_experts", None) == old_e and isinstance(module.num_experts, int):
            module.num_experts = new_e
        if getattr(module, "num_experts_per_tok", None) == old_k and isinstance(module.num_experts_per_tok, int):
            module.num_experts_per_tok = new_k


NoiseTarget = Literal["weight", "bias"]
StateHandling = Literal["copy", "reset"]


def upcycle_experts(
    model: nn.Module,
    factor: int = 2,
    *,
    method: Method = "duplicate",
    selection: Selection = "uniform",
    utility: dict[str, Tensor] | None = None,
    allocation: Allocation = "greedy",
    cap: int = 3,
    router_noise: float = 0.0,
    noise_target: NoiseTarget = "weight",
    preserve_function: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: StateHandling = "copy",
    adapters: dict[str, ExpertsAdapter] | None = None,
    generator: torch.Generator | None = None,
) -> UpcycleReport:
    """Grow every MoE block of ``model`` from E to ``factor * E`` experts, in place.

    Call it between steps with no autograd graph of an earlier forward alive (drop references to
    earlier losses in a hand-written loop, e.g. ``del loss``; Lightning's loop and
    :class:`~weightwise.callbacks.ExpertUpcycling` keep none): the parameters keep their identity
    and grow in place, and while an old graph lives autograd keeps each parameter's gradient
    accumulator with the old shape, so the next backward fails with "invalid gradient ... expected
    shape compatible with [E, ...]".

    Args:
        model: a transformers MoE model (Mixtral, Qwen2/Qwen3-MoE, OLMoE) or any model with ``adapters``.
        factor: m, the growth factor.
        method: ``"duplicate"`` (top-K fixed) or ``"granular"`` (split, top-(m·K)); see the module doc.
        selection: ``"uniform"`` (m copies each) or ``"utility"`` (copies by :func:`allocate_copies`
            from ``utility[block_name]``); duplicate only.
        utility: per-block ``[E]`` utilities (see :class:`weightwise.experts.ExpertUtility`).
        allocation, cap: how utility becomes copies (:func:`allocate_copies`; the reference's greedy, cap 3).
        router_noise: relative std of noise on the copies' router logits (duplicate only; see doc):
            on their router rows (``noise_target="weight"``, relative to the router weight's std) or,
            as the reference, on their router bias (``"bias"``, relative to the std of the copied bias
            entries - transformers' Mixtral/Qwen/OLMoE routers have no bias, hence the default).
        preserve_function: scale the copies' outputs where the router does not renormalise (see the
            module doc); the reference copies experts unscaled (``False``).
        optimizer: an optimizer over the model's parameters whose state is remapped.
        optimizer_state: ``"copy"`` (the reference code's default: copies inherit their source's
            state) or ``"reset"`` (the paper: the upcycled tensors' state is dropped - fused experts
            share one state per tensor, so every expert of an upcycled block starts afresh).
        adapters: the blocks to upcycle, by name (default: every fused-experts block found).
        generator: randomness for ``router_noise``.

    Raises:
        ValueError: a bad setting, blocks of different shapes, ``noise_target="bias"`` for a router
            without a bias.

    Example::

        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> from weightwise.experts import upcycle_experts
        >>> model = MixtralForCausalLM(MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4))
        >>> upcycle_experts(model, 2, method="granular").num_experts
        (4, 8)
    """
    if not isinstance(factor, int) or factor < 2:
        raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
    if method not in ("duplicate", "granular"):
        raise ValueError(f"method must be 'duplicate' or 'granular', got {method!r}")
    if selection == "utility" and (method != "duplicate" or utility is None):
        raise ValueError("selection='utility' needs method='duplicate' and utility={block_name: [E] tensor}")
    if noise_target not in ("weight", "bias"):
        raise ValueError(f"noise_target must be 'weight' or 'bias', got {noise_target!r}")
    if optimizer_state not in ("copy", "reset"):
        raise ValueError(f"optimizer_state must be 'copy' or 'reset', got {optimizer_state!r}")
    blocks = adapters if adapters is not None else find_moe_blocks(model)
    first = next(iter(blocks.values()))
    e, k, inter = first.num_experts, first.top_k, first.intermediate_size
    scaled = first.renormalizes or preserve_function
    report = UpcycleReport(
        method,
        factor,
        (e, e * factor),
        (k, k if method == "duplicate" else k * factor),
        exact=method == "granular"
        or (k == 1 and router_noise == 0.0 and (first.renormalizes or (preserve_function and selection == "uniform"))),
    )
    for name, block in blocks.items():  # every check before the first block changes
        if (block.num_experts, block.top_k, block.intermediate_size) != (e, k, inter):
            raise ValueError("all MoE blocks must share expert count, top-K and expert size to be upcycled together")
        if noise_target == "bias" and router_noise > 0 and block.router_bias is None:
            raise ValueError(
                f"noise_target='bias' but the router of {name!r} has no bias; use noise_target='weight' (noise on the copies'"
                " router rows)"
            )
    for name, block in blocks.items():
        if optimizer is not None and optimizer_state == "reset":  # dropped before the surgery: nothing to remap
            for param in (*block.expert_parameters().values(), block.router_weight, block.router_bias):
                if param is not None:
                    optimizer.state.pop(param, None)
        if method == "granular":
            _split(block, factor, optimizer)
            report.sources[name] = torch.arange(e).repeat_interleave(factor)
            report.copies[name] = torch.full((e,), factor)
        else:
            copies = (
                allocate_copies(utility[name], e * factor, allocation=allocation, cap=cap)
                if selection == "utility"
                else torch.full((e,), factor)
            )
            sources = torch.arange(e).repeat_interleave(copies)
            scale = 1.0 if block.renormalizes or not scaled else float(factor)
            _duplicate(block, sources, scale, router_noise, noise_target, optimizer, generator)
            report.sources[name], report.copies[name] = sources, copies
        block.set_routing(e * factor, report.top_k[1], block.intermediate_size)
    _update_config(model, (e, k, inter), (e * factor, report.top_k[1], first.intermediate_size))
    return report


def _transform_experts(
    block: ExpertsAdapter,
    optimizer: torch.optim.Optimizer | None,
    operation: Callable[[dict[str, Tensor], float], dict[str, Tensor]],
    output_scale: float,
) -> None:
    """Apply ``operation(tensors, scale)`` to the expert weights and to their optimizer state."""
    params = block.expert_parameters()
    for p in params.values():
        p.grad = None  # dropped by the surgery anyway: free it before the new tensors exist
    if optimizer is not None and all(p in optimizer.state for p in params.values()):
        states = [optimizer.state[p] for p in params.values()]
        for key in list(states[0]):  # keys, not values: no old moment outlives its replacement
            same_layout = all(isinstance(s.get(key), Tensor) and s[key].shape == p.shape for s, p in zip(states, params.values()))
            if same_layout:
                # The state follows the gradient, which scales by 1/s where the weight scales by s:
                # first moments by 1/s, second moments by 1/s^2.
                power = 2 if key.endswith("_sq") else 1
                new_state = operation({n: optimizer.state[p][key] for n, p in params.items()}, output_scale**-power)
                for n, p in params.items():
                    optimizer.state[p][key] = new_state[n]
    new_weights = operation({n: p.data for n, p in params.items()}, output_scale)
    for n, p in params.items():
        _replace(p, new_weights[n])


def _duplicate(
    block: ExpertsAdapter,
    sources: Tensor,
    scale: float,
    router_noise: float,
    noise_target: NoiseTarget,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator | None,
) -> None:
    _transform_experts(block, optimizer, lambda tensors, s: block.gather_experts(tensors, sources, s), scale)
    router, bias = block.router_weight, block.router_bias
    index = sources.to(router.device)
    copy = torch.zeros(sources.numel(), dtype=torch.bool)
    copy[1:] = sources[1:] == sources[:-1]  # every copy but the first of its source
    copy = copy.to(router.device)
    rows = router.data[index].clone()
    if router_noise > 0 and noise_target == "weight":
        noise = torch.randn(rows.shape, generator=generator).to(rows) * router_noise * router.data.std()
        rows[copy] += noise[copy]
    _remap_state(optimizer, router, lambda t, p: t[index].clone())
    _replace(router, rows)
    if bias is not None:
        values = bias.data[index].clone()
        if router_noise > 0 and noise_target == "bias" and copy.any():
            # the reference: b[selected] + randn * std(b[selected]) * bias_noise_scale
            spread = values[copy].std() if int(copy.sum()) > 1 else values[copy].abs().mean()
            values[copy] += torch.randn(int(copy.sum()), generator=generator).to(values) * router_noise * spread
        _remap_state(optimizer, bias, lambda t, p: t[index].clone())
        _replace(bias, values)


def _split(block: ExpertsAdapter, parts: int, optimizer: torch.optim.Optimizer | None) -> None:
    _transform_experts(block, optimizer, lambda tensors, s: block.split_experts(tensors, parts, s), float(parts))
    for param in (block.router_weight, block.router_bias):
        if param is not None:
            _remap_state(optimizer, param, lambda t, p: t.repeat_interleave(parts, dim=0))
            _replace(param, param.data.repeat_interleave(parts, dim=0))
