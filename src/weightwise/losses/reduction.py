"""Weighted reduction of per-sample losses to the scalar that is backpropagated."""

from __future__ import annotations

from torch import Tensor


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
