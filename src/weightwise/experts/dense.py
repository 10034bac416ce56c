"""Upcycle a dense transformers model into the matching Mixture-of-Experts class.

Every dense MLP (``gate_proj``, ``up_proj``, ``down_proj``) of a Llama, Mistral, Qwen2 or Qwen3 model
becomes the sparse MoE block of the matching transformers class - Mixtral for Llama and Mistral,
Qwen2-MoE for Qwen2, Qwen3-MoE for Qwen3 - and everything else (embeddings, attention, norms,
head) is kept: the returned model *shares* those ``nn.Parameter`` objects with the dense one, so an
optimizer's state for them stays valid (the callback relies on that). Three initialisations:

``method="copy"`` - sparse upcycling (Komatsuzaki et al., "Sparse Upcycling", ICLR 2023; code in
``google-research/vmoe`` and T5X): every expert is a copy of the dense MLP and the router is new
(random, N(0, 0.02²)). With renormalised top-K weights (Mixtral; Qwen-MoE with
``norm_topk_prob=True``, which weightwise sets), identical experts give the dense output for any
routing: the function is preserved exactly.

``method="granular"`` - fine-grained / virtual-group upcycling (He et al. 2024, "Upcycling Large
Language Models into Mixture of Experts", arXiv 2410.07524; Megatron-LM
``--moe-upcycling-granularity``, ``megatron/core/transformer/moe/upcycling_utils.py``): the dense
MLP's hidden units are split into G shards of I/G units; the E experts are E/G copies of the G shards
(expert ``i*G + g`` is shard g of copy i), and the router is E/G random rows, each repeated for the G
shards of its copy (Megatron takes the first E/G rows of its router init and repeats them). The G
shards of a copy tie, so with top-K a multiple of G whole copies are selected, each shard with weight
1/G of its copy's; scaling the shards' outputs by G restores the dense output exactly (weightwise
scales ``down_proj`` by G, ``scaling="down"``). Megatron scales ``gate_up`` and ``down`` by G^(1/3)
each instead (``scaling="megatron"``): equal for a linear unit, not for SwiGLU, so not exact.

``method="drop"`` - Drop-Upcycling (Nakamura et al., ICLR 2025; authors' code
``Taishi-N324/Drop-Upcycling``, ``conversions/drop_upcycling.py``): copies as above, then in every
expert a random fraction r (``drop_ratio``, 0.5 as the paper recommends and the code defaults to) of
the intermediate units is re-initialised: the rows of ``gate_proj`` and ``up_proj`` and the columns
of ``down_proj`` at those units are drawn from a normal with the mean and standard deviation of the
values they replace (per matrix). The paper re-initialises one index set per expert for all three
matrices (the default here); the code draws a set per matrix (``drop_per_matrix=True``). Its router
is ``torch_rand_002`` (the init its scripts pass): uniform, zero mean, std 0.02
(``router_init="uniform"``). The function is not preserved (that is the point: diversity).

Optimizer state for the new experts: every reference starts the MoE phase with a fresh optimizer
(Megatron loads the dense checkpoint with ``optimizer=None``; Drop-Upcycling converts a saved model
and trains it with a new one), so ``optimizer_state="reset"`` is the default: the experts and routers
start with no state, every other parameter keeps its state. ``"copy"`` gives each expert the dense
MLP's moments laid out like its weights (down moments divided by the output scale s, second moments
by s²; re-initialised units and the routers start at zero).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

DenseMethod = Literal["copy", "granular", "drop"]
Scaling = Literal["down", "megatron"]
RouterInit = Literal["normal", "uniform"]
DenseState = Literal["reset", "copy"]

TARGETS = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
"""Dense ``model_type`` -> the transformers MoE ``model_type`` its MLPs become."""

_CLASS_PREFIX = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe"}
_META_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class DenseUpcycleReport:
    """What :func:`upcycle_dense` did."""

    method: str
    source: str  # dense model_type
    target: str  # MoE model_type
    num_experts: int
    top_k: int
    granularity: int
    exact: bool  # whether the MoE computes the dense function (up to float rounding)
    layers: list[str]  # names of the MLPs replaced


def moe_config(dense_config: Any, num_experts: int, top_k: int, granularity: int = 1) -> Any:
    """The MoE config matching a dense Llama/Mistral/Qwen2/Qwen3 config (experts of I/granularity units).

    Raises:
        ValueError: an unsupported family, or a dense setting the MoE class cannot express
            (attention or MLP biases in Llama; Mixtral's attention has none).
    """
    from transformers import CONFIG_MAPPING  # lazily: importing weightwise costs no transformers

    source = getattr(dense_config, "model_type", None)
    if source not in TARGETS:
        raise ValueError(
            f"upcycle_dense supports dense {sorted(TARGETS)} models (-> Mixtral, Qwen2-MoE, Qwen3-MoE), got {source!r};"
            " for a model that is already a MoE use upcycle_experts"
        )
    if getattr(dense_config, "mlp_bias", False) or (source == "llama" and getattr(dense_config, "attention_bias", False)):
        raise ValueError("this Llama has attention or MLP biases, which Mixtral's layers do not have; it cannot be upcycled exactly")
    inter = dense_config.intermediate_size
    if inter % granularity:
        raise ValueError(f"intermediate size {inter} is not divisible into granularity={granularity} shards")
    kwargs = {k: v for k, v in dense_config.to_dict().items() if k not in _META_KEYS}
    target = TARGETS[source]
    if target == "mixtral":
        kwargs.update(num_local_experts=num_experts, intermediate_size=inter // granularity)
    else:
        kwargs.update(
            num_experts=num_experts,
            moe_intermediate_size=inter // granularity,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,  # renormalised top-K: identical experts give the dense output
        )
        if target == "qwen2_moe":
            # Qwen2's attention always has q/k/v biases; no shared expert (it would add to the dense output).
            kwargs.update(qkv_bias=True, shared_expert_intermediate_size=0)
    kwargs["num_experts_per_tok"] = top_k
    return CONFIG_MAPPING[target](**kwargs)


def check_dense_settings(
    num_experts: int, top_k: int, method: str, granularity: int | None, drop_ratio: float, optimizer_state: str
) -> int:
    """Validate the settings :func:`upcycle_dense` and ``DenseUpcycling`` share; returns the granularity
    (default 2 for ``"granular"``, else 1).

    Raises:
        ValueError: the setting that is wrong, and what it must be.
    """
    if method not in ("copy", "granular", "drop"):
        raise ValueError(f"method must be 'copy', 'granular' or 'drop', got {method!r}")
    if optimizer_state not in ("reset", "copy"):
        raise ValueError(f"optimizer_state must be 'reset' or 'copy', got {optimizer_state!r}")
    if granularity is None:
        granularity = 2 if method == "granular" else 1
    if method != "granular" and granularity != 1:
        raise ValueError(f"granularity={granularity} needs method='granular'")
    if not isinstance(num_experts, int) or num_experts < 2 or num_experts % granularity:
        raise ValueError(f"num_experts must be an integer >= 2 and a multiple of granularity={granularity}, got {num_experts!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}")
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1], got {drop_ratio}")
    return granularity


def upcycle_dense(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    *,
    method: DenseMethod = "copy",
    granularity: int | None = None,
    drop_ratio: float = 0.5,
    drop_per_matrix: bool = False,
    scaling: Scaling = "down",
    router_init: RouterInit | None = None,
    router_std: float = 0.02,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: DenseState = "reset",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Turn a dense transformers Llama/Mistral/Qwen2/Qwen3 model into the matching MoE class.

    Returns a new ``*ForCausalLM`` of the MoE class (Mixtral, Qwen2-MoE, Qwen3-MoE) that shares every
    non-MLP parameter object with ``model``; ``save_pretrained`` / ``from_pretrained`` round-trip it.
    The dense model's MLP parameters are not used by the result; ``result.upcycle_report`` (a
    :class:`DenseUpcycleReport`) says what was done. See the module doc for the methods.

    Args:
        model: a dense ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
            ``Qwen3ForCausalLM`` (or their base ``*Model``).
        num_experts: experts per MoE block.
        top_k: experts per token.
        method: ``"copy"`` (Komatsuzaki et al.), ``"granular"`` (He et al. / Megatron-LM), ``"drop"``
            (Drop-Upcycling).
        granularity: G, shards per copy (``"granular"``; default 2 there, 1 otherwise).
        drop_ratio: r, the fraction of each expert's units re-initialised (``"drop"``).
        drop_per_matrix: draw the re-initialised units per matrix, as the authors' code does (the
            paper: one set per expert, the default).
        scaling: ``"down"`` (exact: the shards' ``down_proj`` times G) or ``"megatron"`` (every
            projection times G^(1/3), as Megatron-LM; not exact for SwiGLU).
        router_init: ``"normal"`` (N(0, router_std²); copy and granular) or ``"uniform"`` (zero-mean
            uniform of std ``router_std``, Drop-Upcycling's ``torch_rand_002``); default: the method's.
        router_std: the router init's standard deviation (0.02 in every reference).
        optimizer: an optimizer over ``model``'s parameters: the dense MLP parameters leave their
            param group and the new experts and routers take their place (the other parameters'
            state is untouched).
        optimizer_state: ``"reset"`` (the references': new experts start without state) or
            ``"copy"`` (see the module doc).
        generator: randomness of the routers and of Drop-Upcycling's units (the same on every rank
            when seeded alike).

    Raises:
        ValueError: an unsupported family or setting (named in the message).

    Example::

        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from weightwise.experts import upcycle_dense
        >>> dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2)).eval()
        >>> moe = upcycle_dense(dense, num_experts=4, top_k=2).eval()
        >>> type(moe).__name__, moe.config.num_local_experts
        ('MixtralForCausalLM', 4)
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> bool(torch.allclose(moe(ids).logits, dense(ids).logits, atol=1e-5))
        True
    """
    granularity = check_dense_settings(num_experts, top_k, method, granularity, drop_ratio, optimizer_state)
    if scaling not in ("down", "megatron"):
        raise ValueError(f"scaling must be 'down' or 'megatron', got {scaling!r}")
    if router_init is None:
        router_init = "uniform" if method == "drop" else "normal"
    if router_init not in ("normal", "uniform") or router_std < 0:
        raise ValueError(f"router_init must be 'normal' or 'uniform' and router_std >= 0, got {router_init!r}, {router_std}")
    import transformers

    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(f"upcycle_dense takes a transformers model, got {type(model).__name__}")
    config = moe_config(model.config, num_experts, top_k, granularity)
    moe_class = getattr(transformers, _CLASS_PREFIX[config.model_type] + ("ForCausalLM" if hasattr(model, "lm_head") else "Model"))
    dense_params = dict(model.named_parameters(remove_duplicate=False))
    layers = [name[: -len(".gate_proj.weight")] for name in dense_params if name.endswith("mlp.gate_proj.weight")]
    if not layers:
        raise ValueError(f"found no dense MLP (mlp.gate_proj/up_proj/down_proj) in {type(model).__name__}")
    reference = dense_params[f"{layers[0]}.gate_proj.weight"]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # Qwen2-MoE's empty shared expert
        moe = moe_class(config)
    moe.to(dtype=reference.dtype)
    if optimizer_state == "copy" and optimizer is not None:
        states = {f"{name}.{p}": optimizer.state.get(dense_params[f"{name}.{p}.weight"], {}) for name in layers for p in _MLP}
    ratio = drop_ratio if method == "drop" else 0.0
    copies = num_experts // granularity
    output_scale = float(granularity)
    new_params: dict[str, nn.Parameter] = {}
    for name in layers:
        gate, up, down = (dense_params[f"{name}.{p}.weight"] for p in _MLP)
        requires_grad = gate.requires_grad
        weights = _expert_tensors(gate.data, up.data, down.data, copies, granularity, output_scale, scaling, power=-1)
        units = _reinitialise(weights, ratio, drop_per_matrix, generator) if ratio > 0 else None
        router = _router(copies, granularity, gate.shape[1], router_init, router_std, generator)
        block = {"gate.weight": router, "experts.gate_up_proj": weights["gate_up_proj"], "experts.down_proj": weights["down_proj"]}
        for key, value in block.items():
            new_params[f"{name}.{key}"] = nn.Parameter(value.to(device=gate.device, dtype=gate.dtype), requires_grad=requires_grad)
        if optimizer_state == "copy" and optimizer is not None:
            _copy_state(optimizer, states, name, new_params, copies, granularity, output_scale, scaling, units)
    _assemble(moe, dense_params, new_params, dict(model.named_buffers()))
    moe.train(model.training)
    if optimizer is not None:
        _replace_in_optimizer(optimizer, moe, dense_params, new_params, layers)
    moe.upcycle_report = DenseUpcycleReport(
        method,
        model.config.model_type,
        config.model_type,
        num_experts,
        top_k,
        granularity,
        exact=ratio == 0.0 and (granularity == 1 or (scaling == "down" and top_k % granularity == 0)),
        layers=layers,
    )
    return moe


def _expert_tensors(
    gate: Tensor, up: Tensor, down: Tensor, copies: int, granularity: int, output_scale: float, scaling: Scaling, power: int
) -> dict[str, Tensor]:
    """Fused ``gate_up_proj [E, 2I/G, H]`` and ``down_proj [E, H, I/G]``: expert ``i*G + g`` is shard g
    of copy i. ``power`` is -1 for weights (scaled by the output scale) and 1, 2 for first and second
    moments (scaled by its inverse power: the gradient of a weight scaled by s scales by 1/s)."""
    inter, hidden = gate.shape
    width = inter // granularity
    gate_scale, down_scale = (1.0, output_scale) if scaling == "down" else (output_scale ** (1 / 3),) * 2
    gate_scale, down_scale = gate_scale ** (-power), down_scale ** (-power)
    shards = torch.cat([gate.reshape(granularity, width, hidden), up.reshape(granularity, width, hidden)], dim=1) * gate_scale
    down_shards = down.reshape(hidden, granularity, width).permute(1, 0, 2) * down_scale
    return {"gate_up_proj": shards.repeat(copies, 1, 1).contiguous(), "down_proj": down_shards.repeat(copies, 1, 1).contiguous()}


def _reinitialise(weights: dict[str, Tensor], ratio: float, per_matrix: bool, generator: torch.Generator | None) -> list[list[Tensor]]:
    """Drop-Upcycling: in every expert, re-draw a fraction ``ratio`` of the units from a normal with the
    mean and std of the values replaced (per matrix). Returns, per expert, the unit indices of the
    gate, up and down matrices."""
    gate_up, down = weights["gate_up_proj"], weights["down_proj"]
    experts, width = down.shape[0], down.shape[-1]
    count = int(width * ratio)
    drawn: list[list[Tensor]] = []
    for e in range(experts):
        first = torch.randperm(width, generator=generator)[:count]
        units = [first] + [torch.randperm(width, generator=generator)[:count] if per_matrix else first for _ in range(2)]
        gate_rows, up_rows = gate_up[e, :width], gate_up[e, width:]
        for matrix, index in ((gate_rows, units[0]), (up_rows, units[1])):
            part = matrix[index]
            matrix[index] = torch.randn(part.shape, generator=generator).to(part) * part.std() + part.mean()
        part = down[e][:, units[2]]
        down[e][:, units[2]] = torch.randn(part.shape, generator=generator).to(part) * part.std() + part.mean()
        drawn.append(units)
    return drawn


def _router(copies: int, granularity: int, hidden: int, init: RouterInit, std: float, generator: torch.Generator | None) -> Tensor:
    """``copies`` random rows, each repeated for the ``granularity`` shards of its copy."""
    if init == "normal":
        rows = torch.randn(copies, hidden, generator=generator) * std
    else:  # Drop-Upcycling's torch_rand_002: (U[0, 1) - mean) * std * sqrt(12)
        rows = torch.rand(copies, hidden, generator=generator)
        rows = (rows - rows.mean()) * std * 12**0.5
    return rows.repeat_interleave(granularity, dim=0)


def _copy_state(
    optimizer: torch.optim.Optimizer,
    states: dict[str, dict],
    name: str,
    new_params: dict[str, nn.Parameter],
    copies: int,
    granularity: int,
    output_scale: float,
    scaling: Scaling,
    units: list[list[Tensor]] | None,
) -> None:
    """``optimizer_state="copy"``: the experts inherit the dense MLP's state, laid out like the weights."""
    gate, up, down = (states[f"{name}.{p}"] for p in _MLP)
    if not gate:
        return
    gate_up_state, down_state = {}, {}
    for key, value in gate.items():
        if isinstance(value, Tensor) and value.ndim == 2:
            power = 2 if key.endswith("_sq") else 1
            moved = _expert_tensors(value, up[key], down[key], copies, granularity, output_scale, scaling, power)
            if units is not None:  # re-initialised units start afresh
                width = moved["down_proj"].shape[-1]
                for e, (g, u, d) in enumerate(units):
                    moved["gate_up_proj"][e, g] = 0
                    moved["gate_up_proj"][e, width + u] = 0
                    moved["down_proj"][e][:, d] = 0
            gate_up_state[key], down_state[key] = moved["gate_up_proj"], moved["down_proj"]
        else:  # e.g. Adam's step count
            gate_up_state[key] = down_state[key] = value.clone() if isinstance(value, Tensor) else value
    optimizer.state[new_params[f"{name}.experts.gate_up_proj"]] = gate_up_state
    optimizer.state[new_params[f"{name}.experts.down_proj"]] = down_state


def _assemble(moe: nn.Module, dense_params: dict[str, nn.Parameter], new_params: dict[str, nn.Parameter], buffers: dict[str, Tensor]) -> None:
    """Put real tensors into the meta-built MoE model: the dense model's own parameter objects, the
    new experts and routers, empty tensors for zero-sized parts, and the dense model's buffers."""
    device = next(iter(dense_params.values())).device
    for name, param in list(moe.named_parameters(remove_duplicate=False)):
        owner_name, _, leaf = name.rpartition(".")
        owner = moe.get_submodule(owner_name)
        if name in new_params:
            owner._parameters[leaf] = new_params[name]
        elif name in dense_params and dense_params[name].shape == param.shape:
            owner._parameters[leaf] = dense_params[name]
        elif param.numel() == 0 or name.endswith("shared_expert_gate.weight"):  # Qwen2-MoE's zero-sized shared expert
            owner._parameters[leaf] = nn.Parameter(torch.zeros(param.shape, dtype=param.dtype, device=device))
        else:
            raise ValueError(f"no dense counterpart for the MoE parameter {name!r}")
    for name, _ in list(moe.named_buffers()):
        owner_name, _, leaf = name.rpartition(".")
        if name not in buffers:
            raise ValueError(f"no dense counterpart for the MoE buffer {name!r}")
        moe.get_submodule(owner_name)._buffers[leaf] = buffers[name].clone()


def _replace_in_optimizer(
    optimizer: torch.optim.Optimizer,
    moe: nn.Module,
    dense_params: dict[str, nn.Parameter],
    new_params: dict[str, nn.Parameter],
    layers: list[str],
) -> None:
    """The dense MLP parameters leave their param group; the layer's new parameters (in the MoE
    block's own order, so a later ``configure_optimizers(model.parameters())`` lists them alike) take
    the place of the first of them. The dense MLP's state is dropped."""
    for name in layers:
        old = [dense_params[f"{name}.{p}.weight"] for p in _MLP]
        block = moe.get_submodule(name)
        new = [p for key, p in block.named_parameters(prefix=name) if key in new_params]
        groups = [g for g in optimizer.param_groups if any(p is o for p in g["params"] for o in old)]
        if not groups:
            continue  # a frozen MLP: its experts stay out of the optimizer too
        if len(groups) > 1 or not all(any(p is o for p in groups[0]["params"]) for o in old):
            raise ValueError(f"the parameters of {name} are in different optimizer param groups; put a layer's MLP in one group")
        params = groups[0]["params"]
        at = next(i for i, p in enumerate(params) if any(p is o for o in old))
        kept = [p for p in params if not any(p is o for o in old)]
        groups[0]["params"] = kept[:at] + new + kept[at:]
        for o in old:
            optimizer.state.pop(o, None)
