"""Per-sample losses and their weighted reduction (docs/architecture.md, contract 1).

One value per sample, never reduced over the batch until :func:`weighted_mean` turns the weighted
losses into the scalar that is backpropagated.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def sequence_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, shift: bool = False) -> Tensor:
    """Token-level cross-entropy reduced to one value per sequence: the mean over its target tokens.

    For language modelling the "sample" is a sequence. Averaging over each sequence's own valid
    tokens (labels != ``ignore_index``, e.g. padding) keeps a short sequence and a long one on the
    same scale, which is what loss-based reweighting compares.

    Args:
        logits: ``[B, T, V]`` unnormalised scores.
        labels: ``[B, T]`` target token ids, ``ignore_index`` where no loss is taken.
        ignore_index: label value that marks tokens without a target (HF convention: -100).
        shift: ``True`` for causal LMs whose labels are the inputs (HF ``labels=input_ids``):
            position t predicts token t + 1, as inside HF's own ``ForCausalLMLoss``.

    Returns:
        ``[B]`` losses. A sequence with no target token gets 0 (it contributes no gradient).
    """
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"sequence_loss expects logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    token_losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(labels.shape)
    valid = (labels != ignore_index).to(token_losses.dtype)
    return (token_losses * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def check_per_sample_loss(losses: object, batch_size: int | None = None) -> Tensor:
    """Validate a per-sample loss and return it; raise an error that names the fix otherwise.

    Args:
        losses: what ``training_step`` returned as its loss.
        batch_size: the number of sample ids in the batch, when known.
    """
    if not isinstance(losses, Tensor):
        raise TypeError(f"training_step must return a loss tensor, got {type(losses).__name__}")
    if not losses.dtype.is_floating_point:
        raise TypeError(f"the per-sample loss must be a floating-point tensor, got {losses.dtype}")
    if losses.ndim == 0:
        raise ValueError(
            "weightwise needs one loss per sample, but training_step returned a scalar (already reduced) loss."
            " Return the unreduced loss, shape [B]: e.g. F.cross_entropy(logits, y, reduction='none'), or"
            " weightwise.losses.sequence_loss(logits, labels) for token-level language-model losses."
        )
    if losses.ndim != 1:
        raise ValueError(
            f"weightwise needs one loss per sample, shape [B], but training_step returned shape {tuple(losses.shape)}."
            " For token-level losses use weightwise.losses.sequence_loss(logits, labels), the masked mean over each"
            " sequence's tokens; otherwise reduce the extra dimensions per sample yourself."
        )
    if batch_size is not None and losses.numel() != batch_size:
        raise ValueError(
            f"training_step returned {losses.numel()} per-sample losses for a batch of {batch_size} sample ids;"
            " return exactly one loss per sample, in the batch's order."
        )
    return losses


def weighted_mean(losses: Tensor, weights: Tensor, *, denominator: float | None = None) -> Tensor:
    """``sum_i w_i l_i / n``: the weighted counterpart of ``losses.mean()``.

    With all weights 1 and no ``denominator`` this *is* ``losses.mean()``, bit for bit (the same
    kernel on the same values), so uniform weighting reproduces plain training exactly.

    Args:
        losses: ``[B]`` per-sample losses, with their graph.
        weights: ``[B]`` weights, detached.
        denominator: divide by this instead of ``B`` (e.g. the global batch size divided by the
            number of data-parallel ranks, so that DDP's gradient averaging yields the mean over the
            global batch even when ranks hold different numbers of samples).
    """
    if losses.shape != weights.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and weights {tuple(weights.shape)} must have one shape")
    if weights.requires_grad:
        raise ValueError("weights must be detached: they scale the gradient, they are not part of it")
    weighted = losses * weights.to(losses.dtype)
    if denominator is None or denominator == losses.numel():
        return weighted.mean()
    return weighted.sum() / denominator
