"""The fine-tuning methods the simulator compares, and the ingredients that change their memory.

A method name is a base method with optional ``+ingredient`` suffixes, e.g. ``lisa_layers+bf16frozen+ckpt``.
The layer-sampling methods (``lisa``, ``lisa_layers``, ``ist_lora``, ``badam``) run weightwise's own
code: :func:`weightwise.layers.find_layer_stack`, a :class:`weightwise.layers.LayerPolicy`'s
``choose`` and :func:`weightwise.layers.activate_layers` with a releasing
:class:`weightwise.layers.OptimizerStateStash` between steps, over an optimizer built on every
trainable parameter as a user would build it - so a library change that stops releasing state or
freezing layers shows up as memory here. ``lisa`` also takes the per-sample loss path
(:func:`weightwise.losses.sequence_loss` -> :func:`~weightwise.losses.loss_weights` ->
:func:`~weightwise.losses.weighted_mean`). The token ingredients (``dft``, ``rho1``) take weightwise's
token path (:func:`token_loss`); ``rho1`` adds a 1.1B-class reference model scored through
weightwise's chunked reference path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchmarks.memory.models import SHAPES, Shape, build
from benchmarks.memory.tracking import Accelerator
from weightwise.layers import (
    HostMasters,
    ISTLayers,
    LayerPolicy,
    OptimizerStateStash,
    OrderedBlocks,
    UniformLayers,
    activate_layers,
    find_layer_stack,
)
from weightwise.losses import (
    dft_weights,
    excess_losses,
    linear_cross_entropy,
    loss_weights,
    sequence_loss,
    token_cross_entropy,
    top_tokens,
    weighted_mean,
)
from weightwise.weighting.tokens import RHO1_KEEP

BASES: dict[str, str] = {
    "full": "full fine-tuning",
    "lora": "LoRA r=8 on q_proj, v_proj (peft)",
    "lisa_hand": "LISA by hand: embeddings, head, final norm and layers 0-1 trainable; AdamW over those only",
    "lisa": "LISA via weightwise: embeddings, head, final norm + 2 sampled layers; per-sample weighted loss",
    "lisa_layers": "LISA via weightwise, 2 sampled layers only (embeddings, head, final norm frozen)",
    "ist_lora": "IST over LoRA: 25% of the layers' LoRA adapters train (weightwise ISTLayers' draws; its probes are"
    " no-grad forwards, below the training step's peak)",
    "badam": "BAdam: 1 layer at a time in descending order (weightwise OrderedBlocks), no embeddings/head",
}
INGREDIENTS: dict[str, str] = {
    "forloop": "AdamW(foreach=False): one parameter at a time (default: foreach, torch's CUDA default)",
    "fused": "AdamW(fused=True)",
    "ckpt": "activation checkpointing of every decoder layer (transformers, non-reentrant)",
    "bf16frozen": "frozen parameters stored in bf16, fp32 only for trainable ones: layer sampling via weightwise's"
    " LayerwiseSampling(frozen_dtype=bf16) path (layers.HostMasters parks the fp32 masters in host memory); LoRA's"
    " frozen base loaded in bf16",
    "linearce": "weightwise per-sample loss from the last hidden states (losses.linear_cross_entropy): no [B, T, V] logits",
    "dft": "weightwise token path with DFT's factor (TokenWeighting('dft')): token losses x detached exp(-loss), token mean",
    "rho1": "Rho-1 (SelectiveTokens): a 1.1B-class reference (TinyLlama shape, bf16 weights, eval, no grad) scored through"
    " weightwise's chunked path (its last hidden states + linear_cross_entropy: no [B, T, V] logits), the top 60% of"
    " tokens by excess loss trained",
}
REFERENCE_SHAPE = "1.1b"  # Rho-1's 1B reference; TinyLlama shares Llama-2's 32k vocabulary, so it also serves the 7B
TOKEN_INGREDIENTS = frozenset(("dft", "rho1"))
# The methods and ingredient combinations a plain run simulates.
DEFAULT_METHODS = (
    "full",
    "lora",
    "lisa_hand",
    "lisa",
    "lisa_layers",
    "ist_lora",
    "badam",
    "full+fused",
    "lisa+forloop",
    "lisa+fused",
    "lisa+ckpt",
    "lisa+ckpt+fused",
    "lisa+bf16frozen",
    "lisa+bf16frozen+ckpt",
    "lisa+bf16frozen+ckpt+fused",
    "lisa_layers+ckpt",
    "lisa_layers+bf16frozen",
    "lisa_layers+bf16frozen+ckpt",
    "lisa_layers+bf16frozen+ckpt+fused",
    "lora+ckpt",
    "lora+bf16frozen",
    "lora+bf16frozen+ckpt",
    "lisa+bf16frozen+ckpt+fused+linearce",
    "lisa_layers+bf16frozen+ckpt+fused+linearce",
    "lora+bf16frozen+ckpt+linearce",
)
HAND_LAYERS = (0, 1)  # the trainable layers of "lisa_hand" (with trainable embeddings, which ones does not matter)
LISA_LAYERS = 2
IST_FRACTION = 0.25


@dataclass(frozen=True)
class Recipe:
    """A base method and its ingredients, parsed from a name such as ``lisa+fused+ckpt``."""

    base: str
    ingredients: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, name: str) -> Recipe:
        base, *extra = name.split("+")
        if base not in BASES:
            raise ValueError(f"unknown method {base!r}; choose from {sorted(BASES)}")
        unknown = sorted(set(extra) - set(INGREDIENTS))
        if unknown:
            raise ValueError(f"unknown ingredient(s) {unknown} in {name!r}; choose from {sorted(INGREDIENTS)}")
        if {"forloop", "fused"} <= set(extra):
            raise ValueError(f"{name!r}: 'forloop' and 'fused' are two AdamW implementations, pick one")
        return cls(base, frozenset(extra))

    def describe(self) -> str:
        return "; ".join([BASES[self.base], *(INGREDIENTS[i] for i in sorted(self.ingredients))])


@dataclass
class Prepared:
    """A model and optimizer ready to train, with what to do before each step and how to get the loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[Tensor], Tensor]
    schedule: list[list[int]] | None  # active layers per step (layer-sampling methods)
    before_step: Callable[[int], None]  # freezes/thaws layers and casts parameters for the step


def layer_schedule(policy: LayerPolicy) -> list[list[int]]:
    """The layers active in the three simulated steps: the policy's draws for periods ``p - 1``, ``p``
    and ``p`` again, where ``p`` is the first period whose draw includes layer 0 and differs from the
    draw before it.

    So the layer set changes before step 2 (whose peak shows whether step 1's state was released),
    and step 3 is the steady state of the new period, with the new layers' optimizer state already
    there during forward and backward - the step a run repeats ``interval - 1`` times per period. The
    new set includes layer 0 because the lowest active layer sets how deep backward goes, and so how
    many layers' activations are kept when nothing below it trains; every long run meets such a
    period, so this is the peak a run reaches, not the luck of its first draws.
    """
    period = 1
    while 0 not in policy.choose(period) or policy.choose(period) == policy.choose(period - 1):
        period += 1
    return [policy.choose(period - 1), policy.choose(period), policy.choose(period)]


def make_policy(base: str, num_layers: int) -> LayerPolicy | None:
    """The weightwise layer policy of a layer-sampling method (``None`` for the others)."""
    if base in ("lisa", "lisa_layers"):
        return UniformLayers(num_layers, LISA_LAYERS, seed=0)
    if base == "badam":
        return OrderedBlocks(num_layers, 1, seed=0, order="descending")
    if base == "ist_lora":
        return ISTLayers(num_layers, max(1, round(IST_FRACTION * num_layers)), seed=0)
    return None


def adamw(params: list[nn.Parameter], ingredients: frozenset[str]) -> torch.optim.Optimizer:
    """AdamW as the method's ingredients ask; foreach by default, as torch picks on CUDA."""
    if "fused" in ingredients:
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    return torch.optim.AdamW(params, lr=1e-5, foreach="forloop" not in ingredients)


def cast_frozen_to_bf16(model: nn.Module) -> None:
    """Store every frozen parameter in bf16 (LoRA: a base model loaded in bf16; its weights never train)."""
    for param in model.parameters():
        if not param.requires_grad and param.dtype != torch.bfloat16:
            param.data = param.data.to(torch.bfloat16)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer (non-reentrant). transformers 5.24 names it
    ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` is its deprecated alias);
    older releases have only ``gradient_checkpointing_enable``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare(recipe: Recipe, shape: Shape, accelerator: Accelerator) -> Prepared:
    """Build the model and optimizer of a method on ``accelerator`` (fake tensors under simulation,
    real CUDA tensors under :mod:`benchmarks.memory.measure`)."""
    model = build(shape, accelerator, lora=recipe.base in ("lora", "ist_lora"))
    if "ckpt" in recipe.ingredients:
        enable_activation_checkpointing(model)
    _, stack = find_layer_stack(model)
    in_stack = set(stack.parameters())
    if recipe.base == "lisa_hand":
        for i, layer in enumerate(stack):
            layer.requires_grad_(i in HAND_LAYERS)
    elif recipe.base in ("lisa_layers", "badam"):
        for p in model.parameters():
            if p not in in_stack:
                p.requires_grad_(False)

    # As a user builds it: over everything trainable now; layer sampling then freezes what it must.
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], recipe.ingredients)
    # What LayerwiseSampling samples: each layer's parameters that were trainable at the start.
    layer_params = [[p for p in layer.parameters() if p.requires_grad] for layer in stack]
    stash = OptimizerStateStash("release")
    with accelerator.real():  # policies keep and draw host tensors, as in a real run
        policy = make_policy(recipe.base, len(stack))
        schedule = None if policy is None else layer_schedule(policy)
    # weightwise's frozen_dtype path; the fp32 masters go to host memory (under simulation the meta
    # device, which the tracker does not count as the accelerator's).
    masters = HostMasters(torch.bfloat16, host=accelerator.host) if "bf16frozen" in recipe.ingredients and schedule is not None else None
    outside = [p for p in model.parameters() if p not in in_stack and not p.requires_grad]
    reference = None
    if "rho1" in recipe.ingredients:
        reference_shape = SHAPES[REFERENCE_SHAPE] if shape.vocab_size == SHAPES[REFERENCE_SHAPE].vocab_size else shape
        reference = build(reference_shape, accelerator).eval().requires_grad_(False)
        cast_frozen_to_bf16(reference)  # an inference-only model, loaded in bf16

    def before_step(step: int) -> None:
        if schedule is not None:
            activate_layers(layer_params, schedule[step], optimizer, stash, masters)
            if masters is not None:
                masters.freeze(outside)  # train_outside_stack=False: embeddings, head and norm stay frozen
        elif "bf16frozen" in recipe.ingredients:
            cast_frozen_to_bf16(model)

    def loss(ids: Tensor) -> Tensor:
        if recipe.ingredients & TOKEN_INGREDIENTS:
            return token_loss(model, ids, accelerator, recipe.ingredients, reference)
        if "linearce" in recipe.ingredients or recipe.base == "lisa":
            return weightwise_loss(model, ids, accelerator, from_hidden="linearce" in recipe.ingredients)
        return model(input_ids=ids, labels=ids).loss

    return Prepared(model, optimizer, loss, schedule, before_step)


def weightwise_loss(model: nn.Module, ids: Tensor, accelerator: Accelerator, *, from_hidden: bool) -> Tensor:
    """The per-sample reduction of weightwise: per-sequence losses, Sow et al.'s ``linupper`` weights,
    the weighted mean.

    The per-sequence losses come from the logits (:func:`weightwise.losses.sequence_loss`) or, with
    ``from_hidden``, from the last hidden states and the output embedding
    (:func:`weightwise.losses.linear_cross_entropy`) reduced per sequence as ``sequence_loss`` does
    (``reduce_token_losses`` selects tokens by a boolean mask, whose data-dependent shape fake
    tensors cannot have). ``loss_weights`` cannot run on fake tensors either (it checks
    ``torch.isfinite(losses).all()`` in Python, which reads a value), so it runs on real stand-in
    losses of the batch's size; the weights are ``[B]`` floats, so their memory is nil either way.
    """
    if from_hidden:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's LlamaForCausalLM
        hidden = causal_lm.model(input_ids=ids).last_hidden_state
        token_losses, mask = linear_cross_entropy(hidden, causal_lm.lm_head.weight, ids, shift=True)
        valid = mask.to(token_losses.dtype)
        losses = (token_losses * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)
    else:
        losses = sequence_loss(model(input_ids=ids).logits, ids, shift=True)
    weights = accelerator.from_real(lambda: loss_weights(torch.linspace(1.0, 3.0, ids.shape[0]), "linupper"))
    return weighted_mean(losses, weights)


def _token_losses(model: nn.Module, ids: Tensor, from_hidden: bool) -> tuple[Tensor, Tensor]:
    """Token losses of a causal LM: from its logits (:func:`weightwise.losses.token_cross_entropy`), or
    from its last hidden states and output embedding (:func:`weightwise.losses.linear_cross_entropy`)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's LlamaForCausalLM
    if from_hidden:
        hidden = causal_lm.get_decoder()(input_ids=ids).last_hidden_state
        return linear_cross_entropy(hidden, causal_lm.lm_head.weight, ids, shift=True)
    return token_cross_entropy(model(input_ids=ids).logits, ids, shift=True)


def token_loss(model: nn.Module, ids: Tensor, accelerator: Accelerator, ingredients: frozenset[str], reference: nn.Module | None) -> Tensor:
    """weightwise's token path: token losses, DFT's factor and/or Rho-1's selection, the mean over the
    selected tokens (what the reducer backpropagates with TokenWeighting / SelectiveTokens).

    The reference's token losses are those of :func:`weightwise.losses.reference_token_losses` - its
    decoder, then the chunked head - without that function's label-range check, which reads values
    fake tensors do not have. The selection (:func:`weightwise.losses.top_tokens` sorts the valid
    scores, whose count is data-dependent) runs on real stand-in scores of the batch's shape: its
    memory is a ``[B, T]`` mask, nil either way; the excess losses are computed on the fake tensors.
    """
    token_losses, mask = _token_losses(model, ids, "linearce" in ingredients)
    weights = mask.to(token_losses.dtype)
    if "dft" in ingredients:
        weights = weights * dft_weights(token_losses, mask)
    if reference is not None:
        with torch.no_grad():
            reference_losses, _ = _token_losses(reference, ids, from_hidden=True)
        excess_losses(token_losses, reference_losses)  # the [B, T] scores the selection ranks
        shape = tuple(mask.shape)
        selected = accelerator.from_real(lambda: top_tokens(torch.rand(shape), torch.ones(shape, dtype=torch.bool), RHO1_KEEP))
        weights = weights * selected.to(weights.device, weights.dtype)
    return (token_losses * weights).sum() / (weights > 0).sum().clamp(min=1)
