"""Pure functions on per-sample losses, usable in any PyTorch training loop - the public face of
:mod:`weightwise.weighting` (losses and weights) and :mod:`weightwise.selection.scores`.

* :func:`sequence_loss` - token-level LM loss reduced to one value per sequence.
* :func:`loss_weights` - the loss-based reweighting strategies of Sow et al. (ICLR 2025).
* :func:`weighted_mean` - the weighted reduction to the scalar that is backpropagated.
* :func:`el2n`, :func:`grand_last_layer` - per-sample difficulty scores (Data Diet).
"""

from weightwise.selection.scores import el2n, grand_last_layer
from weightwise.weighting.losses import (
    check_per_sample_loss,
    sequence_loss,
    weighted_mean,
)
from weightwise.weighting.reweighting import (
    STRATEGIES,
    Strategy,
    loss_weights,
    normalize_losses,
    strategy_scores,
)

__all__ = [
    "STRATEGIES",
    "Strategy",
    "check_per_sample_loss",
    "el2n",
    "grand_last_layer",
    "loss_weights",
    "normalize_losses",
    "sequence_loss",
    "strategy_scores",
    "weighted_mean",
]
