"""Suppression probes: the loss of a model whose chosen layers respond only partly (IST).

IST (Yao et al., EMNLP 2024 Findings; ``antgroup/importance-aware-sparse-tuning-IST-paper``,
``ist.py``) scales the adapters' output of the suppressed layers by 0.25 (``switch_active_adapter``
multiplies LoRA's ``scaling``) and measures the loss in eval mode without gradients.

* With peft LoRA adapters in a layer, their scaling is multiplied (peft's public
  ``LoraLayer.scale_layer`` / ``unscale_layer``), exactly as the reference.
* A layer without adapters (full fine-tuning) has its residual contribution scaled instead:
  ``output = input + factor * (layer(input) - input)`` - the same "respond at a quarter" for a
  whole layer, through a forward hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from weightwise.compute.meter import spending

ProbeLoss = Callable[[pl.LightningModule, Any], Tensor]
"""``probe_loss(pl_module, batch) -> scalar loss`` of the module on a batch (called without grad, in eval mode)."""


def _adapters(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if callable(getattr(m, "scale_layer", None)) and callable(getattr(m, "unscale_layer", None))]


@contextlib.contextmanager
def suppressed(layers: Sequence[nn.Module], factor: float) -> Iterator[None]:
    """Inside the block, each of ``layers`` responds at ``factor`` of its strength (see the module doc)."""
    hooks, scaled = [], []

    def scale_residual(module: nn.Module, args: tuple, output: Any) -> Any:
        hidden_in = args[0]
        hidden_out = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden_in, Tensor) or hidden_in.shape != hidden_out.shape:
            raise ValueError(f"cannot suppress {type(module).__name__}: its first output is not shaped like its first input")
        damped = hidden_in + factor * (hidden_out - hidden_in)
        return (damped, *output[1:]) if isinstance(output, tuple) else damped

    try:
        for layer in layers:
            adapters = _adapters(layer)
            if adapters:
                for adapter in adapters:
                    adapter.scale_layer(factor)
                    scaled.append(adapter)
            else:
                hooks.append(layer.register_forward_hook(scale_residual))
        yield
    finally:
        for adapter in scaled:
            adapter.unscale_layer(factor)
        for hook in hooks:
            hook.remove()


def model_loss(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """The loss of the transformers model inside ``pl_module`` on a batch mapping (``input_ids``,
    ``attention_mask``, ``labels``; labels default to the inputs for a causal LM).

    Raises:
        ValueError: no transformers model in the module, or a batch it cannot read - pass
            ``probe_loss=`` to the callback then.
    """
    from transformers import PreTrainedModel  # lazily: importing weightwise costs no transformers

    model = next((m for m in pl_module.modules() if isinstance(m, PreTrainedModel)), None)
    if model is None or not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            "suppression probes need the model's loss on a batch: the module holds no transformers model fed by a"
            " batch with 'input_ids'; pass probe_loss=lambda module, batch: <scalar loss> to LayerwiseSampling"
        )
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    inputs.setdefault("labels", inputs["input_ids"])
    return model(**inputs).loss


def probe(pl_module: pl.LightningModule, batch: Any, layers: Sequence[nn.Module], factor: float, loss: ProbeLoss) -> Tensor:
    """The loss on ``batch`` with ``layers`` suppressed, in eval mode and without gradients."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad(), suppressed(layers, factor), spending("probes"):  # counted by ComputeBudget
            return loss(pl_module, batch).detach().float()
    finally:
        pl_module.train(was_training)
