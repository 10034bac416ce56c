"""Online loss-based sample reweighting (Sow et al., ICLR 2025).

"Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining",
D. Sow, H. Woisetschläger, S. Bulusu, S. Wang, H.-A. Jacobsen, Y. Liang (ICLR 2025,
arXiv:2502.06733).

The paper weights each sample of a minibatch by solving a KL-regularised problem over the simplex,

    max_w  sum_i w_i f(l~_i) - r * KL(w || uniform)      =>      w_i = softmax(f(l~) / r)_i ,

where the losses are first mapped to [-delta, delta] with the batch's min and max,

    l~_i = delta * (2 l_i - l_max - l_min) / (l_max - l_min)        (0 when all losses are equal),

and ``f`` is the strategy:

* ``linupper``  f(l~) = min(l~ + delta, delta): easy (low-loss) samples are down-weighted linearly,
  every sample above the batch's mid-range gets the same top weight;
* ``quadratic`` f(l~) = 1 - l~^2 / delta^2: both extremes are down-weighted, the middle of the loss
  range gets most weight (robust to outliers such as mislabelled samples);
* ``extremes``  f(l~) = |l~|: the easiest and the hardest samples are up-weighted;
* ``uniform``   every weight is exactly 1 (plain mean-loss training).

weightwise scales the softmax by the batch size, so weights have mean exactly 1 over the batch and
a weighted *mean* of the losses replaces the plain mean: the loss scale and the learning rate that
went with it are unchanged. Each weight lies in [exp(-delta/r), exp(delta/r)] times the batch
mean, is never negative and is detached from the graph (weights are data, not a path for gradients).

Defaults follow the paper's reference configuration: delta = 1, r = 1.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Strategy = Literal["uniform", "linupper", "quadratic", "extremes"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


def normalize_losses(losses: Tensor, delta: float = 1.0) -> Tensor:
    """Map losses affinely onto [-delta, delta] using the batch's min and max (0 when they are equal)."""
    low, high = losses.min(), losses.max()
    spread = high - low
    # torch.where, not an ``if``: no host-device synchronisation on GPU.
    return torch.where(spread > 0, delta * (2.0 * losses - high - low) / spread, torch.zeros_like(losses))


def strategy_scores(normalized: Tensor, strategy: Strategy, delta: float = 1.0) -> Tensor:
    """The paper's ``f(l~)`` for a strategy, applied to normalised losses."""
    if strategy == "linupper":
        return torch.clamp(normalized + delta, max=delta)
    if strategy == "quadratic":
        return 1.0 - normalized.square() / delta**2
    if strategy == "extremes":
        return normalized.abs()
    if strategy == "uniform":
        return torch.zeros_like(normalized)
    raise ValueError(f"unknown reweighting strategy {strategy!r}; choose one of {STRATEGIES}")


def loss_weights(losses: Tensor, strategy: Strategy = "linupper", *, delta: float = 1.0, temperature: float = 1.0) -> Tensor:
    """Per-sample weights for a batch of losses, mean 1, non-negative, detached.

    ``w = B * softmax(f(l~) / r)`` with ``r = temperature`` (Sow et al., 2025, see module doc).
    Pass the losses of the *whole* (global) batch: the min/max normalisation and the softmax are
    batch statistics.

    Args:
        losses: ``[B]`` finite per-sample losses.
        strategy: ``"uniform"``, ``"linupper"``, ``"quadratic"`` or ``"extremes"``.
        delta: half-width of the normalised loss range (the paper's delta).
        temperature: the KL-regularisation strength r; larger is closer to uniform.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown reweighting strategy {strategy!r}; choose one of {STRATEGIES}")
    if delta <= 0 or temperature <= 0:
        raise ValueError(f"delta and temperature must be positive, got delta={delta}, temperature={temperature}")
    if losses.ndim != 1:
        raise ValueError(f"loss_weights expects a 1-D tensor of per-sample losses, got shape {tuple(losses.shape)}")
    losses = losses.detach()
    if strategy == "uniform" or losses.numel() == 0:
        return torch.ones_like(losses)
    if not torch.isfinite(losses).all():
        raise ValueError("loss_weights needs finite losses; drop or fix non-finite samples first")
    scores = strategy_scores(normalize_losses(losses.float(), delta), strategy, delta)
    return (torch.softmax(scores / temperature, dim=0) * losses.numel()).to(losses.dtype)
