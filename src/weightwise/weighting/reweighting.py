"""Online loss-based sample reweighting (Sow et al., ICLR 2025), as pure functions.

"Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining",
D. Sow, H. Woisetschläger, S. Bulusu, S. Wang, H.-A. Jacobsen, Y. Liang (ICLR 2025,
arXiv:2502.06733); authors' code: ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025``,
``src/trainer.py`` (``h_func``, ``F_FUNC_DIC``, ``g_func`` and the weighted loss of
``compute_loss``), configs in ``config/methods/*.json``.

The paper weights each sample of a minibatch by solving a KL-regularised problem over the simplex,

    max_w  sum_i w_i f(l~_i) - r * KL(w || uniform)      =>      w_i = softmax(f(l~) / r)_i ,

where the losses are first mapped to [-delta, delta] with the batch's min and max,

    l~_i = delta * (2 l_i - l_max - l_min) / max(l_max - l_min, 1e-6)

(the clamp is the reference's: near-equal losses give near-uniform weights), and ``f`` is the
strategy (the reference's names in brackets):

* ``linupper``  f(l~) = min(l~ + delta, delta): easy (low-loss) samples are down-weighted linearly,
  every sample above the batch's mid-range gets the same top weight;
* ``quadratic`` [``mid``] f(l~) = 1 - l~^2 / delta^2: both extremes are down-weighted, the middle
  of the loss range gets most weight (robust to outliers such as mislabelled samples);
* ``extremes``  f(l~) = |l~|: up-weights the two ends of the batch's *normalised* loss range (its
  min and max); the sample midway between them weighs least (e^(delta/r), about 12x less at r = 0.4).
  One outlier sets the range, so everything else sits near the low end and is up-weighted as
  "easy": with 30% flipped labels, flipped samples weighed 0.65 and clean ones 1.15;
* ``upper``     f(l~) = 0.5 l~ + 0.5 delta: up-weights in proportion to the loss (the ICLR code's
  ``upper``; the authors' FSDP branch uses the name ``upper`` for ``linupper``'s formula);
* ``uniform``   every weight is exactly 1 (plain mean-loss training).

weightwise scales the softmax by the batch size, so weights have mean exactly 1 over the batch and
a weighted *mean* of the losses replaces the plain mean (the reference's weights sum to 1 and its
loss is multiplied by the global batch size: the same step). Weights are never negative and are
detached from the graph (weights are data, not a path for gradients).

Temperature: the reference dataclass defaults to r = 1, but five of its six published
configurations use r = 0.4 (``ours_nodr_210m``, ``ours_nodr_684m``, ``ours_c4cc_large``,
``ours_doge_large``, ``ours_doremi_large``); weightwise's default is 0.4.

Beyond the reference - the statistics over a *window* (:func:`loss_weights` with ``window``): with
micro-batches of one to four sequences (single-GPU LLM training with gradient accumulation) the
min/max and the softmax of one micro-batch are meaningless (one sequence always gets weight 1).
With ``window`` = the recent losses of the run (the current batch included), the range
``[l_min, l_max]`` and the softmax's normaliser come from the window:
``w_i = exp(f(l~_i)/r) / mean_window exp(f(l~_j)/r)``. With the window equal to the batch this is
exactly the reference's formula.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Strategy = Literal["uniform", "linupper", "quadratic", "extremes", "upper", "mid"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
ALIASES = {"mid": "quadratic"}
"""The reference code's name for a strategy weightwise calls otherwise."""

MIN_SPREAD = 1e-6
"""The reference's floor on ``l_max - l_min`` (``max(l_max - l_min, 1e-6)`` in ``h_func``)."""


def check_strategy(strategy: str) -> str:
    """The canonical name of ``strategy``.

    Raises:
        ValueError: an unknown strategy.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown reweighting strategy {strategy!r}; choose one of {STRATEGIES}")
    return ALIASES.get(strategy, strategy)


def normalize_losses(losses: Tensor, delta: float = 1.0, *, reference: Tensor | None = None) -> Tensor:
    """Map losses affinely onto [-delta, delta] by the min and max of ``reference`` (default: ``losses``).

    ``l~ = delta * (2 l - l_max - l_min) / max(l_max - l_min, 1e-6)``, the reference's ``h_func``.
    Losses outside the reference's range map outside [-delta, delta].
    """
    reference = losses if reference is None else reference
    low, high = reference.min(), reference.max()
    # A tensor clamp, not an ``if``: no host-device synchronisation on GPU.
    return delta * (2.0 * losses - high - low) / (high - low).clamp(min=MIN_SPREAD)


def strategy_scores(normalized: Tensor, strategy: Strategy, delta: float = 1.0) -> Tensor:
    """The paper's ``f(l~)`` for a strategy, applied to normalised losses."""
    strategy = check_strategy(strategy)  # type: ignore[assignment]
    if strategy == "linupper":
        return torch.clamp(normalized + delta, max=delta)
    if strategy == "quadratic":
        return 1.0 - normalized.square() / delta**2
    if strategy == "extremes":
        return normalized.abs()
    if strategy == "upper":
        return 0.5 * normalized + 0.5 * delta
    return torch.zeros_like(normalized)  # uniform


def loss_weights(
    losses: Tensor,
    strategy: Strategy = "linupper",
    *,
    delta: float = 1.0,
    temperature: float = 0.4,
    window: Tensor | None = None,
) -> Tensor:
    """Per-sample weights for a batch of losses: mean 1 over the batch (or window), non-negative, detached.

    ``w = B * softmax(f(l~) / r)`` with ``r = temperature`` (Sow et al., 2025, see the module doc).
    Pass the losses of the *whole* (global) batch: the min/max normalisation and the softmax are
    batch statistics.

    Args:
        losses: ``[B]`` finite per-sample losses.
        strategy: ``"uniform"``, ``"linupper"``, ``"quadratic"`` (``"mid"``), ``"extremes"`` or ``"upper"``.
        delta: half-width of the normalised loss range (the paper's delta).
        temperature: the KL-regularisation strength r; larger is closer to uniform.
        window: recent losses of the run, the current batch included: the range and the softmax's
            normaliser are taken over it instead of the batch (see the module doc); ``None``: the batch.

    Raises:
        ValueError: an unknown strategy, non-positive ``delta``/``temperature``, losses that are not
            1-D or not finite.

    Example::

        >>> import torch
        >>> from weightwise.losses import loss_weights
        >>> loss_weights(torch.tensor([0.0, 1.0, 2.0]), "linupper", temperature=1.0)
        tensor([0.4661, 1.2670, 1.2670])
    """
    strategy = check_strategy(strategy)  # type: ignore[assignment]
    if delta <= 0 or temperature <= 0:
        raise ValueError(f"delta and temperature must be positive, got delta={delta}, temperature={temperature}")
    if losses.ndim != 1:
        raise ValueError(f"loss_weights expects a 1-D tensor of per-sample losses, got shape {tuple(losses.shape)}")
    losses = losses.detach()
    if strategy == "uniform" or losses.numel() == 0:
        return torch.ones_like(losses)
    if not torch.isfinite(losses).all():
        raise ValueError("loss_weights needs finite losses; drop or fix non-finite samples first")
    values = losses.float()
    if window is None:
        scores = strategy_scores(normalize_losses(values, delta), strategy, delta)
        return (torch.softmax(scores / temperature, dim=0) * losses.numel()).to(losses.dtype)
    window = window.detach().float()
    scores = strategy_scores(normalize_losses(values, delta, reference=window), strategy, delta) / temperature
    window_scores = strategy_scores(normalize_losses(window, delta, reference=window), strategy, delta) / temperature
    top = torch.maximum(scores.max(), window_scores.max())
    return (torch.exp(scores - top) / torch.exp(window_scores - top).mean()).to(losses.dtype)
