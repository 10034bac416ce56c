"""Per-sample losses and their weighted reduction (docs/architecture.md, contract 1).

One value per sample, never reduced over the batch until :func:`weighted_mean` turns the weighted
losses into the scalar that is backpropagated. For language models the sample is a sequence - or,
in packed rows, a document:

* :func:`token_cross_entropy` - token losses ``[B, T]`` and their mask, computed in chunks so that
  no ``[B, T, V]`` float32 copy of the logits exists (for a 128k vocabulary at 4 x 2048 tokens that
  copy alone is 4 GiB); :func:`linear_cross_entropy` goes further and never materialises the
  logits at all, from the last hidden states and the output embedding.
* :func:`reduce_token_losses` - the mean over each sequence's (or each packed document's) valid
  tokens, and the token counts the reducer weights sequences by (Sow et al.'s trainer weights
  sequences by their share of the batch's tokens).
* :func:`sequence_loss` - both at once, for a ``training_step`` that returns ``[B]``.
* :func:`reduce_weighted_token_losses` - the same samples with a factor per token (DFT's
  probabilities, Rho-1's selection: :mod:`weightwise.weighting.tokens`), and each sample's count of
  selected tokens, which :func:`token_shares` divides by.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

TokenWeighting = Literal["rank", "global"]

DEFAULT_CHUNK_TOKENS = 1024
"""Tokens per chunk of the chunked cross-entropy: a float32 chunk of logits is 1024 x V x 4 bytes,
128 MiB at a 32k vocabulary and 512 MiB at 128k (the whole ``[4, 2048, 128k]`` copy would be 4 GiB)."""


def _chunked_token_losses(
    n_tokens: int, labels: Tensor, ignore_index: int, chunk_tokens: int, chunk_logits: Callable[[int, int], Tensor], *inputs: Tensor
) -> Tensor:
    """Cross-entropy of ``n_tokens`` flat tokens, ``chunk_tokens`` at a time, each chunk checkpointed.

    ``chunk_logits(start, stop)`` computes the chunk's logits from ``inputs``. Under autograd each
    chunk is recomputed in the backward pass, so at most one chunk's float32 logits (and their
    softmax) exist at any time.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")

    def chunk_loss(start: int, stop: int, *tensors: Tensor) -> Tensor:
        return F.cross_entropy(chunk_logits(start, stop).float(), labels[start:stop], ignore_index=ignore_index, reduction="none")

    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    pieces = []
    for start in range(0, n_tokens, chunk_tokens):
        stop = min(start + chunk_tokens, n_tokens)
        if needs_graph:
            pieces.append(checkpoint(chunk_loss, start, stop, *inputs, use_reentrant=False))
        else:
            pieces.append(chunk_loss(start, stop, *inputs))
    return torch.cat(pieces) if pieces else labels.new_zeros(0, dtype=torch.float32)


def _flat_targets(labels: Tensor, ignore_index: int, shift: bool) -> Tensor:
    """The flat ``[B * T]`` target of every position. With ``shift`` the labels move left - position t's
    target is ``labels[:, t + 1]`` and the last position's is ``ignore_index`` - so that the logits (or
    hidden states) are flattened as they are: slicing them ``[:, :-1]`` first would make the flattening a
    ``[B, T - 1, V]`` copy, which the checkpointed chunks would then keep alive until the backward pass."""
    if not shift:
        return labels.reshape(-1)
    targets = labels.new_full(labels.shape, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets.view(-1)


def _unflattened(losses: Tensor, labels: Tensor, ignore_index: int, shift: bool) -> tuple[Tensor, Tensor]:
    """Flat token losses back to ``[B, T]`` - ``[B, T - 1]`` with ``shift``, without the last position,
    which has no target - and the mask of the tokens that have one."""
    losses = losses.view(labels.shape)
    if shift:
        return losses[:, :-1].contiguous(), labels[:, 1:] != ignore_index
    return losses, labels != ignore_index


def token_cross_entropy(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, shift: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy ``[B, T]`` (float32) and the mask of tokens that have a target.

    The logits stay in their dtype (e.g. bf16); each chunk of ``chunk_tokens`` tokens is upcast,
    reduced and - under autograd - recomputed in the backward pass, so no ``[B, T, V]`` float32
    copy is ever held. Contiguous logits are not copied at all, with or without ``shift`` (they
    are read as a ``[B * T, V]`` view; ``shift`` moves the labels, not the logits).

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` target ids, ``ignore_index`` where no loss is taken (padding, prompts).
        ignore_index: label value without a target (HF convention: -100).
        shift: ``True`` for causal LMs whose labels are the inputs (HF ``labels=input_ids``):
            position t predicts token t + 1; the outputs then have ``T - 1`` columns (the last
            position, which has no next token, is left out).
        chunk_tokens: tokens per chunk.

    Raises:
        ValueError: shapes that do not match.
    """
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), _flat_targets(labels, ignore_index, shift)
    losses = _chunked_token_losses(
        flat_labels.numel(), flat_labels, ignore_index, chunk_tokens, lambda a, b: flat_logits[a:b], flat_logits
    )
    return _unflattened(losses, labels, ignore_index, shift)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy of ``hidden @ weight.T (+ bias)`` without materialising the logits.

    For a causal LM: ``hidden`` is the last hidden state (``model.model(...).last_hidden_state``)
    and ``weight`` the output embedding (``model.lm_head.weight``). Each chunk's logits are computed,
    reduced and dropped; the backward pass recomputes them chunk by chunk. Peak memory is one
    chunk's float32 logits instead of the ``[B, T, V]`` logits and their float32 copy.

    Args:
        hidden: ``[B, T, H]``.
        weight: ``[V, H]``.
        labels: ``[B, T]``, ``ignore_index`` where no loss is taken.
        bias: optional ``[V]``.
        ignore_index, shift, chunk_tokens: as in :func:`token_cross_entropy`.

    Returns:
        ``([B, T'] float32 token losses, [B, T'] mask)``.

    Raises:
        ValueError: shapes that do not match.
    """
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2] or weight.ndim != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"expected hidden [B, T, H], weight [V, H], labels [B, T]; got {tuple(hidden.shape)}, {tuple(weight.shape)},"
            f" {tuple(labels.shape)}"
        )
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), _flat_targets(labels, ignore_index, shift)
    inputs = (flat_hidden, weight) if bias is None else (flat_hidden, weight, bias)
    losses = _chunked_token_losses(
        flat_labels.numel(), flat_labels, ignore_index, chunk_tokens, lambda a, b: F.linear(flat_hidden[a:b], weight, bias), *inputs
    )
    return _unflattened(losses, labels, ignore_index, shift)


def document_ids_from_positions(position_ids: Tensor) -> Tensor:
    """Document index of every token of packed rows, ``[B, T]``, from 0 in each row: a document
    starts where its position id is 0 (the packing convention of HF's ``DataCollatorWithFlattening``).

    A row that begins inside a document (a packer that carries positions across rows) starts with
    that document's tail: it is the row's document 0, a sample of its own, not padding.

    Example::

        >>> document_ids_from_positions(torch.tensor([[0, 1, 0, 1, 2], [7, 8, 0, 1, 0]]))
        tensor([[0, 0, 1, 1, 1],
                [0, 0, 1, 1, 2]])
    """
    if position_ids.ndim != 2:
        raise ValueError(f"position_ids must be [B, T], got {tuple(position_ids.shape)}")
    starts = position_ids == 0
    return torch.cumsum(starts.long(), dim=1) - starts[:, :1].long()


def _per_sample_sums(mask: Tensor, document_ids: Tensor | None, *values: Tensor) -> tuple[list[Tensor], Tensor]:
    """Each sample's sums of ``values`` over its tokens in ``mask``, and its token count. A sample is a
    row, or a document of a packed row (``document_ids``; negative: padding), in row then document
    order; samples without a token in ``mask`` are left out."""
    mask = mask.bool()
    if document_ids is None:
        keys = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)
    else:
        if document_ids.shape != mask.shape:
            raise ValueError(f"document_ids must be [B, T] like the token losses, got {tuple(document_ids.shape)}")
        mask = mask & (document_ids >= 0)
        width = int(document_ids.max().clamp(min=0)) + 1
        keys = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1) * width + document_ids.clamp(min=0)
    samples, index = torch.unique(keys[mask], sorted=True, return_inverse=True)
    sums = [torch.zeros(samples.numel(), dtype=v.dtype, device=v.device).index_add(0, index, v[mask]) for v in values]
    counts = torch.zeros(samples.numel(), dtype=torch.long, device=mask.device).index_add(0, index, torch.ones_like(index))
    return sums, counts


def reduce_token_losses(token_losses: Tensor, mask: Tensor, document_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The mean loss over each sample's valid tokens, and the number of those tokens.

    A sample is a row (a sequence), or - with ``document_ids`` - each document of a packed row, in
    row order then document order. Tokens outside ``mask`` (padding, ``ignore_index``) never count.
    Samples without any valid token are left out (they carry no loss and no gradient).

    Args:
        token_losses: ``[B, T]`` losses, with their graph.
        mask: ``[B, T]`` bool, the tokens that count.
        document_ids: optional ``[B, T]`` document index of each token within its row (e.g. from
            :func:`document_ids_from_positions`); negative values count as padding.

    Returns:
        ``([S] per-sample losses, [S] token counts)``.

    Raises:
        ValueError: shapes that do not match.
    """
    if token_losses.ndim != 2 or mask.shape != token_losses.shape:
        raise ValueError(f"token losses [B, T] and mask [B, T] expected, got {tuple(token_losses.shape)} and {tuple(mask.shape)}")
    (sums,), counts = _per_sample_sums(mask, document_ids, token_losses)
    return sums / counts.to(sums.dtype), counts


def reduce_weighted_token_losses(
    token_losses: Tensor, mask: Tensor, token_weights: Tensor, document_ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per sample, ``sum_t w_t l_t / n`` over its ``n`` valid tokens, and how many of them have ``w_t > 0``.

    The token-level half of the one combined weight (docs/architecture.md, contract 3): the samples
    are those of :func:`reduce_token_losses` (same order, same counts ``n``), so that a sample-level
    factor and the token shares (:func:`token_shares` with ``selected``) complete it to
    ``sum_t w_sample w_t l_t / N_selected``. With every ``w_t = 1`` the losses are
    :func:`reduce_token_losses`' bit for bit.

    Args:
        token_losses: ``[B, T]`` losses, with their graph.
        mask: ``[B, T]`` bool, the valid tokens.
        token_weights: ``[B, T]`` detached, non-negative; 0 leaves a token out (not selected).
        document_ids: as in :func:`reduce_token_losses`.

    Returns:
        ``([S] weighted per-sample losses, [S] selected-token counts)``.

    Raises:
        ValueError: shapes that do not match, or weights that require grad.
    """
    if token_losses.ndim != 2 or mask.shape != token_losses.shape or token_weights.shape != token_losses.shape:
        raise ValueError(
            f"token losses, mask and token weights must all be [B, T], got {tuple(token_losses.shape)}, {tuple(mask.shape)}"
            f" and {tuple(token_weights.shape)}"
        )
    if token_weights.requires_grad:
        raise ValueError("token weights must be detached: they scale the gradient, they are not part of it")
    weighted = token_losses * token_weights.to(token_losses.dtype)
    (sums, selected), counts = _per_sample_sums(mask, document_ids, weighted, (token_weights > 0).long())
    return sums / counts.to(sums.dtype), selected


def token_shares(
    tokens: Tensor, ranks: Tensor, scope: TokenWeighting = "rank", num_ranks: int = 1, selected: Tensor | None = None
) -> Tensor:
    """Per-sample factors that weight sequences by their share of the batch's tokens.

    With uniform weights, the weighted mean (over the global batch) of per-sequence mean losses
    then equals a token mean:

    * ``"rank"`` (Sow et al.'s trainer, ``len_norms = num_active / num_active.sum()`` on each rank,
      and what plain ``model(**batch).loss`` under DDP optimises): each rank's token mean, averaged
      over the ranks - ``n_i (B / R) / N_r`` for a sample of rank r, whose ``N_r`` tokens are its
      rank's, with ``B`` samples on ``R`` ranks;
    * ``"global"``: the token mean of the global batch, ``n_i B / N`` - independent of how sequences
      were split over ranks (HF ``Trainer``'s ``num_items_in_batch``).

    With token-level weights (:func:`reduce_weighted_token_losses`) the denominators count the
    *selected* tokens instead (``selected``; Rho-1's ``1 / (N k%)``): ``n_i B / N_selected``.

    Args:
        tokens: ``[B]`` token counts of the global batch's samples.
        ranks: ``[B]`` the rank each came from.
        scope: ``"rank"`` or ``"global"``.
        num_ranks: R, the data-parallel world size.
        selected: ``[B]`` selected-token counts of the samples (default: ``tokens``, every token).

    Raises:
        ValueError: an unknown scope.
    """
    counted = tokens if selected is None else selected
    if scope == "global":
        return tokens * tokens.numel() / counted.sum().clamp(min=1.0)
    if scope != "rank":
        raise ValueError(f"token_weighting must be 'rank' or 'global', got {scope!r}")
    index = ranks.long()
    per_rank_tokens = torch.zeros(num_ranks, dtype=tokens.dtype, device=tokens.device).index_add(0, index, counted)
    return tokens * (tokens.numel() / num_ranks) / per_rank_tokens[index].clamp(min=1.0)


def sequence_loss(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, shift: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> Tensor:
    """Token-level cross-entropy reduced to one value per sequence: the mean over its target tokens.

    For language modelling the "sample" is a sequence. Averaging over each sequence's own valid
    tokens (labels != ``ignore_index``, e.g. padding) keeps a short sequence and a long one on the
    same scale, which is what loss-based reweighting compares. Computed in chunks
    (:func:`token_cross_entropy`). Return ``{"loss": token_losses, "mask": mask}`` from
    ``training_step`` instead to have the reducer also weight sequences by their token counts.

    Args:
        logits: ``[B, T, V]`` unnormalised scores.
        labels: ``[B, T]`` target token ids, ``ignore_index`` where no loss is taken.
        ignore_index: label value that marks tokens without a target (HF convention: -100).
        shift: ``True`` for causal LMs whose labels are the inputs (HF ``labels=input_ids``):
            position t predicts token t + 1, as inside HF's own ``ForCausalLMLoss``.
        chunk_tokens: tokens per chunk of the cross-entropy.

    Returns:
        ``[B]`` losses. A sequence with no target token gets 0 (it contributes no gradient).

    Raises:
        ValueError: shapes that do not match.
    """
    token_losses, mask = token_cross_entropy(logits, labels, ignore_index=ignore_index, shift=shift, chunk_tokens=chunk_tokens)
    valid = mask.to(token_losses.dtype)
    return (token_losses * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def check_per_sample_loss(losses: object, batch_size: int | None = None) -> Tensor:
    """Validate a per-sample loss and return it; raise an error that names the fix otherwise.

    Args:
        losses: what ``training_step`` returned as its loss.
        batch_size: the number of sample ids in the batch, when known.

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: a scalar, a tensor of more dimensions, or a length other than ``batch_size``.
    """
    if not isinstance(losses, Tensor):
        raise TypeError(f"training_step must return a loss tensor, got {type(losses).__name__}")
    if not losses.dtype.is_floating_point:
        raise TypeError(f"the per-sample loss must be a floating-point tensor, got {losses.dtype}")
    if losses.ndim == 0:
        raise ValueError(
            "weightwise needs one loss per sample, but training_step returned a scalar (already reduced) loss."
            " Return the unreduced loss, shape [B]: e.g. F.cross_entropy(logits, y, reduction='none'), or token"
            " losses {'loss': token_losses, 'mask': mask} from weightwise.losses.token_cross_entropy(logits, labels)."
        )
    if losses.ndim != 1:
        raise ValueError(
            f"weightwise needs one loss per sample, shape [B], but training_step returned shape {tuple(losses.shape)}."
            " For token-level losses [B, T] return {'loss': token_losses, 'mask': mask} (mask: the tokens that count;"
            " weightwise.losses.token_cross_entropy gives both), or reduce per sequence with"
            " weightwise.losses.sequence_loss(logits, labels)."
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

    Raises:
        ValueError: shapes that differ, or weights that require grad.
    """
    if losses.shape != weights.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and weights {tuple(weights.shape)} must have one shape")
    if weights.requires_grad:
        raise ValueError("weights must be detached: they scale the gradient, they are not part of it")
    weighted = losses * (weights if weights.dtype == losses.dtype else weights.to(losses.dtype))
    if denominator is None or denominator == losses.numel():
        return weighted.mean()
    return weighted.sum() / denominator
