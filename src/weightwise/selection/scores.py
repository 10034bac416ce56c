"""Per-sample difficulty scores from one forward pass: EL2N and a last-layer GraNd bound.

Paul, Ganguli & Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in
Training" (NeurIPS 2021), score a sample by

* EL2N: ``||softmax(z) - onehot(y)||_2`` - the error vector's norm; and
* GraNd: ``E ||grad_theta loss||_2`` - the gradient norm.

The full gradient norm needs one backward per sample. Its last-layer part is free: for logits
``z = W h + b`` the cross-entropy gradient is ``(p - y) h^T`` for W and ``p - y`` for b, so

    ||grad_{W,b} loss||_2 = ||p - y||_2 * sqrt(||h||_2^2 + 1)

which :func:`grand_last_layer` returns (the cheap bound of Katharopoulos & Fleuret, ICML 2018,
uses the same ``p - y`` factor). Both are detached: scores rank samples, they carry no gradient.
Return them from ``training_step`` as ``{"loss": losses, "scores": {"el2n": el2n(logits, y)}}`` and
weightwise records them per sample in the score store.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
