"""Per-sample difficulty scores: EL2N, GraNd, and GraNd's last-layer part.

Paul, Ganguli & Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in
Training" (NeurIPS 2021; ``mansheej/data_diet``, ``data_diet/scores.py``), score a sample by

* EL2N: ``||softmax(z) - onehot(y)||_2`` - the error vector's norm (:func:`el2n`); and
* GraNd: ``||grad_theta loss||_2`` over *every* trainable parameter - the reference's ``jacrev`` of
  the per-sample loss w.r.t. all ``params`` (:func:`grand`, per-sample gradients with ``torch.func``;
  memory grows with batch x parameters, so it suits models up to a few hundred million parameters
  in small batches).

Both papers score in eval mode without updating anything (see :mod:`weightwise.selection.scoring`).
The last-layer part of the gradient norm is free from the forward pass: for logits ``z = W h + b``
the cross-entropy gradient is ``(p - y) h^T`` for W and ``p - y`` for b, so

    ||grad_{W,b} loss||_2 = ||p - y||_2 * sqrt(||h||_2^2 + 1)

which :func:`grand_last_layer` returns - a lower bound of GraNd, not GraNd (Katharopoulos &
Fleuret, ICML 2018, use the same ``p - y`` factor for importance sampling). Scores are detached:
they rank samples, they carry no gradient. Return them from ``training_step`` as
``{"loss": losses, "scores": {"el2n": el2n(logits, y)}}`` and weightwise records them per sample in
the score store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _error_vector(logits: Tensor, labels: Tensor) -> Tensor:
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [B, C] and labels [B], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return probs - torch.nn.functional.one_hot(labels, logits.shape[-1]).to(probs.dtype)


def el2n(logits: Tensor, labels: Tensor) -> Tensor:
    """EL2N score ``||softmax(logits) - onehot(labels)||_2`` per sample, ``[B]`` (Paul et al., 2021)."""
    return torch.linalg.vector_norm(_error_vector(logits, labels), dim=-1)


def grand_last_layer(logits: Tensor, labels: Tensor, features: Tensor) -> Tensor:
    """Norm of the cross-entropy gradient w.r.t. the last linear layer's weight and bias, ``[B]``.

    Args:
        logits: ``[B, C]`` outputs of the last layer ``z = W h + b``.
        labels: ``[B]`` class ids.
        features: ``[B, H]`` its inputs ``h``.
    """
    if features.ndim != 2 or features.shape[0] != logits.shape[0]:
        raise ValueError(f"expected features [B, H] for logits {tuple(logits.shape)}, got {tuple(features.shape)}")
    feature_norm_sq = features.detach().float().square().sum(dim=-1)
    return el2n(logits, labels) * torch.sqrt(feature_norm_sq + 1.0)


def grand(model: nn.Module, loss_fn: Callable[..., Tensor], *inputs: Any, chunk_size: int | None = None) -> Tensor:
    """GraNd: the norm of each sample's loss gradient w.r.t. every trainable parameter, ``[B]``.

    Per-sample gradients with ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``), as
    the reference's ``jacrev`` over the batch. Call it in eval mode without autograd recording
    (e.g. inside a scoring pass).

    Args:
        model: the network; its trainable parameters (``requires_grad``) are differentiated.
        loss_fn: ``loss_fn(model_call, *sample) -> scalar`` for one sample (tensors with a leading
            batch dimension of 1), where ``model_call(*args, **kwargs)`` runs ``model`` functionally -
            e.g. ``lambda call, x, y: F.cross_entropy(call(x), y)``.
        inputs: batched tensors (batch dimension first), sliced per sample.
        chunk_size: samples per ``vmap`` chunk (bounds memory: chunk x parameters floats).

    Example::

        >>> import torch, torch.nn.functional as F
        >>> from weightwise.losses import grand
        >>> model = torch.nn.Linear(3, 2)
        >>> grand(model, lambda call, x, y: F.cross_entropy(call(x), y), torch.randn(4, 3), torch.tensor([0, 1, 0, 1])).shape
        torch.Size([4])
    """
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(trainable: dict[str, Tensor], *sample: Tensor) -> Tensor:
        batch = [t.unsqueeze(0) for t in sample]

        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, ({**frozen, **trainable}, buffers), args, kwargs)

        return loss_fn(call, *batch)

    grads = vmap(grad(sample_loss), in_dims=(None, *([0] * len(inputs))), chunk_size=chunk_size)(params, *inputs)
    squared = sum(g.flatten(1).float().square().sum(dim=1) for g in grads.values())
    return torch.sqrt(squared).detach()
