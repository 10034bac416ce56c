"""Token-level weights: which tokens of a language-model batch count, and how much.

The functional core of token weighting (docs/architecture.md, contract 3: the token factor joins
the sample-level factors in the reducer's one combined weight). Each function takes token losses
``[B, T]`` and their mask as :func:`weightwise.losses.token_cross_entropy` returns them, and gives a
detached ``[B, T]`` factor per token (0: not selected):

* :func:`dft_weights` - Dynamic Fine-Tuning (Wu et al., "On the Generalization of SFT: A
  Reinforcement Learning Perspective with Reward Rectification", 2025; authors' code
  ``yongliang-wu/DFT``, ``verl/verl/trainer/fsdp_dft_trainer.py``, ``_compute_loss_and_backward``):
  each token's loss times its own probability, detached, ``p = softmax(logits)[label]``. Here
  ``p = exp(-loss)``: the same number from the token loss the chunked cross-entropy already has, so
  no ``[B, T, V]`` softmax is built.
* :func:`top_tokens` - Rho-1's selective language modelling (Lin et al., "Rho-1: Not All Tokens Are
  What You Need", NeurIPS 2024; ``microsoft/rho``, whose repository holds the evaluation code only -
  the training code was never released, its issue #4 - so the paper is the reference): rank the
  tokens of the batch by excess loss (:func:`excess_losses`, the training loss minus a reference
  model's) and keep the top ``k%`` - over the *global* batch: every rank's valid tokens are gathered,
  so the selected set and its size are those of one process holding the whole batch, and every rank
  takes the same decision (contract 5).
* :func:`reference_token_losses` - a reference model's token losses through the same chunked path
  (:func:`weightwise.losses.linear_cross_entropy`: from its last hidden states and output
  embedding, so not even its logits are materialised), without gradients; :class:`ReferenceLosses`
  runs it as one module call, so a :class:`weightwise.compute.ComputeMeter` counts the whole pass
  (decoder and chunked head) as ``"reference_model"``.

Sow et al.'s loss-based strategies are *not* offered per token: their normalisation
``(2l - lmax - lmin) / (lmax - lmin)`` is built for the range of per-sequence mean losses; over the
10^5-10^6 tokens of a batch the range is set by a few extreme tokens (a rare token's loss is
10-20 nats, a predictable one's ~0), so ``l~`` of almost every token collapses to one value and
``softmax(f(l~)/r)`` to nearly uniform weights, and the authors neither derive nor evaluate a token
version - while Rho-1's analysis finds the persistently high-loss tokens are mostly noise, the ones
"upper"/"extremes" would up-weight. A custom token strategy plugs into
:class:`~weightwise.weighting.token_callback.TokenWeighting` as a callable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from weightwise.core import collectives
from weightwise.weighting.losses import DEFAULT_CHUNK_TOKENS, linear_cross_entropy

RHO1_KEEP = 0.6
"""Rho-1's token selection ratio for its 1B runs (TinyLlama-1.1B on OpenWebMath; its 7B runs keep 0.7)."""


def _check_token_inputs(token_losses: Tensor, mask: Tensor) -> None:
    if token_losses.ndim != 2 or mask.shape != token_losses.shape:
        raise ValueError(f"token losses [B, T] and mask [B, T] expected, got {tuple(token_losses.shape)} and {tuple(mask.shape)}")


def dft_weights(token_losses: Tensor, mask: Tensor) -> Tensor:
    """DFT's factor: each valid token's probability ``exp(-loss)``, detached; 0 outside ``mask``.

    Example::

        >>> import torch
        >>> dft_weights(torch.tensor([[0.0, 0.6931]]), torch.tensor([[True, True]])).round(decimals=3)
        tensor([[1.0000, 0.5000]])

    Raises:
        ValueError: shapes that do not match.
    """
    _check_token_inputs(token_losses, mask)
    return torch.where(mask.bool(), torch.exp(-token_losses.detach().float()), 0.0)


def excess_losses(token_losses: Tensor, reference_losses: Tensor) -> Tensor:
    """Rho-1's score ``L_delta = L_theta - L_ref`` per token, detached.

    Raises:
        ValueError: the reference's token losses shaped otherwise (another ``shift``, labels or
            sequence length than the training step's).
    """
    if reference_losses.shape != token_losses.shape:
        raise ValueError(
            f"the reference model's token losses {tuple(reference_losses.shape)} are not shaped like the training step's"
            f" {tuple(token_losses.shape)}: compute both from the same labels with the same shift (a causal LM trained on"
            " labels=input_ids uses shift=True in weightwise.losses.token_cross_entropy)"
        )
    return token_losses.detach().float() - reference_losses.detach().float().to(token_losses.device)


def selected_count(valid: int, keep: float) -> int:
    """How many of ``valid`` tokens the top ``keep`` fraction holds: ``int(keep * valid)`` (Rho-1's ``N * k%``).

    Raises:
        ValueError: no valid token, or a ``keep`` that selects none of them.
    """
    if valid == 0:
        raise ValueError(
            "the global batch has no valid token (every label is ignore_index, or the mask is empty): token selection"
            " needs at least one token with a target - check the labels and the mask the training step returns"
        )
    k = int(keep * valid)
    if k == 0:
        raise ValueError(
            f"keep={keep} of the global batch's {valid} valid tokens selects none: raise keep to at least {1 / valid:.3g}"
            " or train on larger batches"
        )
    return k


def top_tokens(scores: Tensor, mask: Tensor, keep: float) -> Tensor:
    """The top ``keep`` fraction of the *global* batch's valid tokens by ``scores``, as a ``[B, T]`` bool mask.

    Every rank's valid scores are gathered (:func:`weightwise.core.collectives.all_gather_variable`;
    all ranks call this in lock-step), sorted once, and the first ``int(keep * N)`` taken, ties in
    rank order then position order - so the set is the one a single process holding the whole
    batch would select, and every rank agrees on it. Tokens with a non-finite score are never
    selected (and not counted in ``N``).

    Example::

        >>> import torch
        >>> top_tokens(torch.tensor([[3.0, 1.0, 2.0, 9.0]]), torch.tensor([[True, True, True, False]]), 0.67)
        tensor([[ True, False,  True, False]])

    Raises:
        ValueError: ``keep`` outside (0, 1], shapes that do not match, no valid token in the global
            batch, or a ``keep`` that selects none (:func:`selected_count`).
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    _check_token_inputs(scores, mask)
    valid = mask.bool() & torch.isfinite(scores)
    (gathered,), local = collectives.all_gather_variable(scores[valid].float())
    k = selected_count(gathered.numel(), keep)
    chosen = torch.zeros(gathered.numel(), dtype=torch.bool, device=gathered.device)
    chosen[torch.sort(gathered, descending=True, stable=True).indices[:k]] = True
    selected = torch.zeros_like(valid)
    selected[valid] = chosen[local]
    return selected


def output_vocabulary(model: nn.Module) -> int | None:
    """The size of a model's output vocabulary: the rows of its output embedding (HF
    ``get_output_embeddings``), found on the model or its first submodule that has one; ``None`` if none."""
    for module in model.modules():
        getter = getattr(module, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        weight = getattr(head, "weight", None)
        if isinstance(weight, Tensor) and weight.ndim == 2:
            return int(weight.shape[0])
    return None


def check_plain_head(model: nn.Module) -> None:
    """Refuse a reference model whose logits are not ``hidden @ W.T (+ b)`` (softcapped or scaled
    logits, e.g. Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``).

    Raises:
        ValueError: such a model, or one without ``get_decoder``/``get_output_embeddings``.
    """
    config = getattr(model, "config", None)
    transformed = [name for name in ("final_logit_softcapping", "logit_scale") if getattr(config, name, None) not in (None, 1, 1.0)]
    missing = [name for name in ("get_decoder", "get_output_embeddings") if not callable(getattr(model, name, None))]
    if transformed or missing:
        reason = f"its logits are transformed ({', '.join(transformed)})" if transformed else f"it has no {', '.join(missing)}"
        raise ValueError(
            f"the reference model's token losses are computed from its last hidden states and output embedding, but {reason}:"
            " pass reference_loss=lambda batch: (token_losses, mask) instead (e.g. from"
            " weightwise.losses.token_cross_entropy(reference(**inputs).logits, labels, shift=True))"
        )


@torch.no_grad()
def reference_token_losses(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    labels_key: str = "labels",
    shift: bool = True,
    ignore_index: int = -100,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[Tensor, Tensor]:
    """A HF causal LM's token losses on ``batch``, without gradients and without its logits.

    The decoder (``model.get_decoder()``) runs on ``input_ids`` (with ``attention_mask`` and
    ``position_ids`` when the batch has them); the losses come from its last hidden states and the
    output embedding in chunks (:func:`weightwise.losses.linear_cross_entropy`), so the peak is one
    chunk's float32 logits, never ``[B, T, V]``.

    Args:
        model: the reference model (in eval mode, on the batch's device).
        batch: a mapping with ``input_ids`` and optionally ``labels_key`` (default: the inputs).
        labels_key, shift, ignore_index, chunk_tokens: as for the training step's
            :func:`weightwise.losses.token_cross_entropy`.

    Raises:
        ValueError: a batch without ``input_ids``, a reference model whose head is not a plain linear
            map (:func:`check_plain_head`), or labels outside its vocabulary.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            "the reference model needs a batch mapping with 'input_ids' (and optionally 'labels', 'attention_mask',"
            " 'position_ids'); for other batches pass reference_loss=lambda batch: (token_losses, mask)"
        )
    check_plain_head(model)
    labels = batch.get(labels_key, batch["input_ids"])
    head = model.get_output_embeddings()
    vocabulary = int(head.weight.shape[0])
    targets = labels[labels != ignore_index]
    if targets.numel() and (int(targets.max()) >= vocabulary or int(targets.min()) < 0):
        raise ValueError(
            f"label id {int(targets.max())} is outside the reference model's vocabulary of {vocabulary}: the reference must"
            " share the trained model's tokenizer"
        )
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
    return linear_cross_entropy(
        hidden, head.weight, labels, bias=head.bias, ignore_index=ignore_index, shift=shift, chunk_tokens=chunk_tokens
    )


class ReferenceLosses(nn.Module):
    """:func:`reference_token_losses` of ``model`` as one module call: a
    :class:`weightwise.compute.ComputeMeter` counts the outermost module calls, so the chunked head
    (functional ``F.linear``) is counted with the decoder, as ``"reference_model"`` FLOPs.

    Args:
        model: the reference causal LM.
        options: keyword arguments of :func:`reference_token_losses`.
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__()
        self.model = model
        self.options = options

    def forward(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        return reference_token_losses(self.model, batch, **self.options)
