"""Pure functions on per-sample losses, usable in any PyTorch training loop - the public face of
:mod:`weightwise.weighting` (losses and weights) and :mod:`weightwise.selection.scores`.

* :func:`token_cross_entropy`, :func:`linear_cross_entropy` - token losses and their mask, in chunks
  (no ``[B, T, V]`` float32 copy; no logits at all for the latter).
* :func:`reduce_token_losses`, :func:`document_ids_from_positions`, :func:`token_shares` - per-sequence
  or per-document losses from token losses, and their token shares.
* :func:`sequence_loss` - token-level LM loss reduced to one value per sequence.
* :func:`reduce_weighted_token_losses`, :func:`dft_weights`, :func:`excess_losses`, :func:`top_tokens`,
  :func:`reference_token_losses` - token-level weights: DFT, Rho-1's selection (:mod:`weightwise.weighting.tokens`).
* :func:`loss_weights` - the loss-based reweighting strategies of Sow et al. (ICLR 2025).
* :func:`weighted_mean` - the weighted reduction to the scalar that is backpropagated.
* :func:`el2n`, :func:`grand`, :func:`grand_last_layer` - per-sample difficulty scores (Data Diet).
"""

from weightwise.selection.scores import el2n, grand, grand_last_layer
from weightwise.weighting.losses import (
    check_per_sample_loss,
    document_ids_from_positions,
    linear_cross_entropy,
    reduce_token_losses,
    reduce_weighted_token_losses,
    sequence_loss,
    token_cross_entropy,
    token_shares,
    weighted_mean,
)
from weightwise.weighting.reweighting import STRATEGIES, Strategy, loss_weights, normalize_losses, strategy_scores
from weightwise.weighting.tokens import dft_weights, excess_losses, reference_token_losses, top_tokens

__all__ = [
    "STRATEGIES",
    "Strategy",
    "check_per_sample_loss",
    "dft_weights",
    "document_ids_from_positions",
    "el2n",
    "excess_losses",
    "grand",
    "grand_last_layer",
    "linear_cross_entropy",
    "loss_weights",
    "normalize_losses",
    "reduce_token_losses",
    "reduce_weighted_token_losses",
    "reference_token_losses",
    "sequence_loss",
    "strategy_scores",
    "token_cross_entropy",
    "token_shares",
    "top_tokens",
    "weighted_mean",
]
