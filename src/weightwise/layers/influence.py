"""Block influence: how much a layer changes the hidden states that pass through it (ShortGPT).

Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect" (2024);
code ``icip-cas/ShortGPT``, ``shortgpt/metrics.py`` (``block_influence``) and
``shortgpt/shortgpt.py`` (``compute_bi``, ``remove_layers``):

    BI_i = 1 - E_tokens[ cos(x_i, x_{i+1}) ]

where ``x_i`` is the hidden state entering layer ``i`` and ``x_{i+1}`` the hidden state it puts out,
for every token of a few calibration batches. A layer that barely turns its input (BI near 0) is
redundant: ShortGPT removes the ``n`` layers of lowest BI (:func:`redundant_layers`).

Here the states are caught with forward hooks on the layer stack (:func:`find_layer_stack`), in
eval mode and without gradients. Departures from the reference, each named:

* **Padding is masked** (``mask_key``, default the batch's ``attention_mask``): the reference
  tokenises its prompts with padding and averages over every position, padding included.
* **The last layer's output is its own output.** The reference takes ``x_{i+1}`` from
  transformers' ``output_hidden_states``, whose last entry is the output of the model's final
  norm, so its BI of the last layer compares that layer's input with the *normed* output - a
  different quantity from every other layer's (the two agree while the norm's weight is uniform,
  as at initialisation: RMSNorm then only rescales each token, which the cosine ignores; they part
  once the weight is trained). The hooks compare every layer with its own output.
* **A mean, not a sum**: the reference adds ``1 - cos`` over all tokens of all batches; here the
  sum is divided by the token count, so values lie in ``[0, 2]`` and do not grow with the
  calibration set (the ranking is the same).
* The reference's quirks that are kept: a token whose input or output is the zero vector has
  ``cos = 0.5`` (its ``nan_to_num(nan=0.5)``), and ``angular=True`` gives its angular distance
  ``arccos(cos) / pi`` instead of ``1 - cos``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from weightwise.layers.stack import find_layer_stack

Forward = Callable[[nn.Module, Any], Any]
"""``forward(model, batch)``: runs the model on a batch (its return value is not used)."""

Layers = str | nn.ModuleList | Sequence[nn.Module] | None


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` with a mapping's ``input_ids``/``attention_mask`` (and ``inputs_embeds``,
    ``position_ids``), ``model(*batch)`` for a tuple or list, ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "inputs_embeds", "position_ids")})
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _stack(model: nn.Module, layers: Layers) -> Sequence[nn.Module]:
    if layers is None or isinstance(layers, str):
        return find_layer_stack(model, layers)[1]
    stack = list(layers)
    if not stack:
        raise ValueError("layers is empty: pass the layer stack (a ModuleList), its dotted path, or None to find it")
    return stack


def token_similarity(inputs: Tensor, outputs: Tensor) -> Tensor:
    """Cosine similarity of every token's input and output state, ``[...]`` (float32).

    As the reference: ``<x, y> / (|x| |y|)``, and 0.5 where it is undefined (a zero vector).

    Example:
        >>> token_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [2.0, 2.0], [1.0, 0.0]]))
        tensor([0.0000, 1.0000, 0.5000])
    """
    x, y = inputs.float(), outputs.float()
    similarity = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    return similarity.nan_to_num(nan=0.5)


def _hidden(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return getattr(value, "hidden_states", None) if not isinstance(value, (tuple, list)) else None


@contextlib.contextmanager
def _catch_states(stack: Sequence[nn.Module], sink: Callable[[int, Tensor, Tensor], None]) -> Iterator[None]:
    handles = []

    def hook_for(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden_in = args[0] if args else kwargs.get("hidden_states")
            hidden_out = _hidden(output)
            if not isinstance(hidden_in, Tensor) or hidden_out is None or hidden_in.shape != hidden_out.shape:
                raise ValueError(
                    f"block influence needs layer {index} ({type(module).__name__}) to take the hidden states as its first"
                    " argument (or hidden_states=) and return states of the same shape first"
                )
            sink(index, hidden_in, hidden_out)

        return hook

    try:
        for index, layer in enumerate(stack):
            handles.append(layer.register_forward_hook(hook_for(index), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def influence_totals(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Layers = None,
    *,
    forward: Forward | None = None,
    mask_key: str | None = "attention_mask",
    angular: bool = False,
) -> tuple[Tensor, Tensor]:
    """The sums behind :func:`block_influence`: ``(per-layer sum of 1 - cos over tokens [L], tokens)``.

    Both float64, on the device of the hidden states - for reducing over data-parallel ranks
    (add both, then divide) before taking the mean.

    Raises:
        ValueError: see :func:`block_influence`.
    """
    stack = _stack(model, layers)
    run = forward or default_forward
    totals: Tensor | None = None
    tokens: Tensor | None = None
    mask: list[Tensor | None] = [None]

    def sink(index: int, hidden_in: Tensor, hidden_out: Tensor) -> None:
        nonlocal totals, tokens
        similarity = token_similarity(hidden_in, hidden_out)
        distance = torch.arccos(similarity.clamp(-1.0, 1.0)) / math.pi if angular else 1.0 - similarity
        valid = mask[0]
        if valid is not None and valid.shape != distance.shape:
            raise ValueError(
                f"the batch's {mask_key!r} has shape {tuple(valid.shape)} but layer {index}'s states are"
                f" {tuple(hidden_in.shape)}: pass mask_key=None, or a forward that keeps the batch's layout"
            )
        weights = torch.ones_like(distance) if valid is None else valid.to(distance.device, distance.dtype)
        if totals is None:
            totals = torch.zeros(len(stack), dtype=torch.float64, device=distance.device)
        totals[index] += (distance * weights).sum().double()
        if index == 0:
            count = weights.sum().double()
            tokens = count if tokens is None else tokens + count

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _catch_states(stack, sink):
            for batch in batches:
                raw = batch.get(mask_key) if mask_key is not None and isinstance(batch, Mapping) else None
                mask[0] = None if raw is None else raw != 0
                run(model, batch)
    finally:
        model.train(was_training)
    if totals is None or tokens is None:
        raise ValueError("no batch reached the layer stack: pass at least one batch that the model runs through its layers")
    return totals, tokens


def block_influence(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Layers = None,
    *,
    forward: Forward | None = None,
    mask_key: str | None = "attention_mask",
    angular: bool = False,
) -> Tensor:
    """ShortGPT's block influence of every layer of the stack, ``[L]`` (float64, CPU).

    ``BI_i = 1 - mean over tokens of cos(input of layer i, output of layer i)`` on ``batches``, in
    eval mode and without gradients (the module docstring lists the departures from the reference).

    Args:
        model: the model (any ``nn.Module``, e.g. a transformers causal LM or a LightningModule).
        batches: calibration batches (e.g. a few batches of the training data).
        layers: the layer stack: a ``ModuleList``, its dotted path, or ``None`` to find it
            (:func:`weightwise.layers.find_layer_stack`).
        forward: ``(model, batch) -> anything`` running the model (default: :func:`default_forward`).
        mask_key: the mapping batch's ``[B, T]`` mask of real tokens (``None``: every position counts).
        angular: the angular distance ``arccos(cos) / pi`` instead of ``1 - cos`` (the reference's option).

    Raises:
        ValueError: no layer stack, no batch, a layer whose first input/output are not hidden states
            of one shape, or a mask of another shape than the states' tokens.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                      num_hidden_layers=3, num_attention_heads=2))
        >>> batch = {"input_ids": torch.randint(0, 32, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
        >>> block_influence(model, [batch]).shape
        torch.Size([3])
    """
    totals, tokens = influence_totals(model, batches, layers, forward=forward, mask_key=mask_key, angular=angular)
    return (totals / tokens.clamp(min=1.0)).cpu()


def redundant_layers(
    model: nn.Module,
    batches: Iterable[Any],
    n: int,
    layers: Layers = None,
    *,
    forward: Forward | None = None,
    mask_key: str | None = "attention_mask",
    angular: bool = False,
) -> list[int]:
    """The ``n`` layers of lowest block influence, lowest first: what ShortGPT would remove.

    For reporting (weightwise removes no layer). Ties go to the lower index (a stable sort).

    Raises:
        ValueError: ``n`` outside ``[0, L]``, or see :func:`block_influence`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                      num_hidden_layers=4, num_attention_heads=2))
        >>> len(redundant_layers(model, [{"input_ids": torch.randint(0, 32, (2, 8))}], n=2))
        2
    """
    influence = block_influence(model, batches, layers, forward=forward, mask_key=mask_key, angular=angular)
    if not 0 <= n <= influence.numel():
        raise ValueError(f"n={n} but the stack has {influence.numel()} layers")
    return torch.argsort(influence, stable=True)[:n].tolist()
