"""Perplexity-based data pruning with a small reference model (Ankner et al., 2024).

"Perplexed by Perplexity: Perplexity-Based Data Pruning With Small Reference Models", Z. Ankner,
C. Blakeney, K. Sreenivasan, M. Marion, M. L. Leavitt, M. Paul (2024; arXiv 2405.20541). There is
no official code; this module follows the paper's Algorithm 1:

1. A small reference model (125M parameters in the paper), trained beforehand on a separate split
   of the data, scores every training sample once by its perplexity
   ``PPL(x) = exp(mean over x's target tokens of -log p(x_t | x_<t))`` (:func:`sequence_perplexity`;
   the targets are the shifted inputs, padding and ``-100`` labels masked).
2. The samples are ranked by perplexity and a band of quantiles is kept, of width the selection
   rate ``r_s`` (:class:`PerplexityBandSampler`'s ``keep_fraction``):

   * ``"low"``: quantiles ``[0, r_s]`` - the samples the reference model finds most predictable;
   * ``"medium"``: ``[0.5 - r_s / 2, 0.5 + r_s / 2]`` - around the median;
   * ``"high"``: ``[1 - r_s, 1]`` - the least predictable.

3. The final model trains on the kept band only.

The scoring is weightwise's forward-only scoring pass (:mod:`weightwise.selection.scoring`):
``DataPruning(score_fn=reference_perplexity(reference_model))`` runs it before the first epoch -
each rank scores its share of the training set with the *reference* model in eval mode without
gradients, the scores of all ranks are gathered into the run's score store (so every rank plans
the same), and the store is checkpointed, so a resumed run neither rescores nor re-selects.

**Default band.** The paper finds that the best band depends on the data's domain composition: on
the Pile, keeping the *high*-perplexity band at ``r_s = 0.5`` gave its best downstream results, on
Dolma the *medium* band (our reading of its Section 3; the paper has no code to check against, and
the choice interacts with the data mix, so treat the default as a starting point and try
``"medium"`` for web-heavy data). :class:`PerplexityBandSampler` therefore defaults to
``band="high", keep_fraction=0.5``.

Usage (the reference model kept outside the trained module; any causal LM with the same tokenizer)::

    reference = AutoModelForCausalLM.from_pretrained("EleutherAI/pythia-160m")  # a small LM of the same tokenizer
    sampler = PerplexityBandSampler(len(train_set), keep_fraction=0.5, band="high")
    loader = DataLoader(IndexedDataset(train_set), batch_size=8, sampler=sampler, collate_fn=collate)
    trainer = pl.Trainer(callbacks=[DataPruning(score_fn=reference_perplexity(reference))], use_distributed_sampler=False)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from weightwise.selection.ranking import rank_range
from weightwise.selection.score_pruning import ScorePruningSampler
from weightwise.weighting.losses import DEFAULT_CHUNK_TOKENS, token_cross_entropy

Band = Literal["low", "medium", "high"]
BANDS: tuple[Band, ...] = ("low", "medium", "high")

ReferenceInputs = Callable[[Any], Mapping[str, Tensor]]
"""``inputs(batch) -> {"input_ids": [B, T], "attention_mask": [B, T] (optional), "labels": [B, T] (optional)}``."""

ReferenceForward = Callable[[nn.Module, Tensor, "Tensor | None"], Any]
"""``forward(model, input_ids, attention_mask or None) -> logits [B, T, V] or an output with .logits``."""


def _transformers_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Any:
    if attention_mask is None:
        return model(input_ids=input_ids)
    return model(input_ids=input_ids, attention_mask=attention_mask)


def sequence_perplexity(
    logits: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Tensor:
    """Per-sequence perplexity of a causal LM: ``exp`` of the mean NLL over the shifted targets.

    Position ``t`` predicts token ``t + 1``; a target counts when its label is not ``ignore_index``
    and (with ``attention_mask``) the target token is not padding. The cross-entropy is taken in
    float32, in chunks of ``chunk_tokens`` (no ``[B, T, V]`` float32 copy of the logits).

    Args:
        logits: ``[B, T, V]`` outputs of the model on the sequences.
        labels: ``[B, T]`` target ids (the inputs for plain language modelling), ``ignore_index``
            where no target is taken.
        attention_mask: ``[B, T]``, 0 on padding (optional).
        ignore_index: the label value without a target (HF convention: -100).
        chunk_tokens: tokens per chunk of the cross-entropy.

    Returns:
        ``[B]`` float32 perplexities; ``nan`` for a sequence without any target token (shorter than
        two tokens, or all padding), whose perplexity is undefined.

    Raises:
        ValueError: shapes that do not match.

    Example:
        >>> logits = torch.zeros(1, 3, 4)  # uniform over a vocabulary of 4
        >>> sequence_perplexity(logits, torch.tensor([[0, 1, 2]]))
        tensor([4.])
    """
    if attention_mask is not None and attention_mask.shape != labels.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match labels {tuple(labels.shape)}")
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, ignore_index)
    token_losses, mask = token_cross_entropy(logits, labels, ignore_index=ignore_index, shift=True, chunk_tokens=chunk_tokens)
    valid = mask.to(token_losses.dtype)
    counts = valid.sum(dim=1)
    mean_nll = (token_losses * valid).sum(dim=1) / counts.clamp(min=1.0)
    return torch.where(counts > 0, mean_nll.exp(), torch.full_like(mean_nll, float("nan")))


def _default_inputs(batch: Any) -> Mapping[str, Tensor]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            "reference_perplexity reads the batch's 'input_ids' (and 'attention_mask', 'labels' if present), but the"
            f" batch is a {type(batch).__name__}{' without input_ids' if isinstance(batch, Mapping) else ''}; pass"
            " inputs=lambda batch: {'input_ids': ..., 'attention_mask': ...} to reference_perplexity"
        )
    return {key: batch[key] for key in ("input_ids", "attention_mask", "labels") if key in batch}


def _logits_of(output: Any) -> Tensor:
    logits = getattr(output, "logits", output)
    if isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise ValueError(
            "the reference model must return [B, T, V] logits (a tensor, or an output with .logits like a transformers"
            f" causal LM), got {type(output).__name__}"
        )
    return logits


def reference_perplexity(
    reference_model: nn.Module,
    *,
    name: str = "perplexity",
    inputs: ReferenceInputs | None = None,
    forward: ReferenceForward | None = None,
    micro_batch_size: int | None = None,
    ignore_index: int = -100,
) -> Callable[[pl.LightningModule, Any], dict[str, Tensor]]:
    """A scoring-pass score function: every sample's perplexity under ``reference_model``.

    Use it as ``DataPruning(score_fn=reference_perplexity(model))`` with a
    :class:`PerplexityBandSampler` (Ankner et al., 2024; see the module docstring). The trained
    module is not used: the reference model runs forward only, in eval mode and without gradients,
    on the module's device (it is moved there, and put in eval mode, on its first call). By default
    it is called as ``reference_model(input_ids=..., attention_mask=...)`` (``attention_mask`` when
    the batch has one) and must return logits ``[B, T, V]`` or an object with ``.logits``. It must
    share the trained data's tokenizer (or ``inputs`` must re-tokenise). Keep it out of the
    LightningModule's attributes: there it would be checkpointed, and trained if the optimizer
    sees its parameters.

    Args:
        reference_model: the small reference LM (e.g. a transformers ``AutoModelForCausalLM``).
        name: the score's name in the store (the sampler's ``score``).
        inputs: ``batch -> {"input_ids", "attention_mask"?, "labels"?}`` (default: those keys of a
            mapping batch; the labels default to the input ids).
        forward: ``(model, input_ids, attention_mask or None) -> logits`` for models that are not called
            with transformers' keywords (default: ``model(input_ids=..., attention_mask=...)``).
        micro_batch_size: forward the batch in chunks of this many sequences (default: all at once).
        ignore_index: label value without a target.

    Returns:
        ``score_fn(module, batch) -> {name: [B] perplexities}``.

    Raises:
        ValueError: (when called) a batch without ``input_ids`` and no ``inputs=``, or a model that
            returns no logits; (now) a non-positive ``micro_batch_size``.

    Example:
        >>> from weightwise.callbacks import DataPruning
        >>> reference = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
        >>> score_fn = reference_perplexity(reference, forward=lambda model, ids, mask: model(ids))
        >>> score_fn(None, {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]])})["perplexity"].shape
        torch.Size([2])
        >>> pruning = DataPruning(score_fn=score_fn)  # with PerplexityBandSampler(len(train_set)) in the loader
    """
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    read_inputs = inputs or _default_inputs
    call = forward or _transformers_forward

    @torch.no_grad()
    def score(module: pl.LightningModule | None, batch: Any) -> dict[str, Tensor]:
        fields = dict(read_inputs(batch))
        input_ids = fields["input_ids"]
        device = input_ids.device if module is None else module.device
        if reference_model.training:
            reference_model.eval()
        first = next(iter(reference_model.parameters()), None)
        if first is not None and first.device != device:
            reference_model.to(device)
        input_ids = input_ids.to(device)
        mask = fields.get("attention_mask")
        mask = None if mask is None else mask.to(device)
        labels = fields.get("labels", input_ids).to(device)
        step = micro_batch_size or max(1, input_ids.shape[0])
        pieces = []
        for start in range(0, input_ids.shape[0], step):
            rows = slice(start, start + step)
            logits = _logits_of(call(reference_model, input_ids[rows], None if mask is None else mask[rows]))
            pieces.append(
                sequence_perplexity(logits, labels[rows], None if mask is None else mask[rows], ignore_index=ignore_index)
            )
        return {name: torch.cat(pieces)}

    return score


class PerplexityBandSampler(ScorePruningSampler):
    """Train on a band of reference-model perplexity: Ankner et al. (2024)'s perplexity pruning.

    Before the first epoch, ``DataPruning`` runs one scoring pass with the reference model
    (``DataPruning(score_fn=reference_perplexity(reference_model))``, each rank its share,
    gathered); the sampler then keeps ``keep_fraction`` (the paper's selection rate ``r_s``) of
    the samples - the ``band`` of perplexity quantiles ``low = [0, r_s]``,
    ``medium = [0.5 - r_s/2, 0.5 + r_s/2]`` or ``high = [1 - r_s, 1]`` - for the whole run, in a fresh
    order every epoch. Defaults: ``band="high"``, ``keep_fraction=0.5`` (the paper's best on the
    Pile; the module docstring says why, and when to prefer ``"medium"``).

    Built on :class:`weightwise.selection.score_pruning.ScorePruningSampler` (no warm-up, one
    scoring pass, never rescored): the selection and the scores are checkpointed, so a resumed run
    trains on the same samples without scoring again. Ties in perplexity are broken by sample id.
    Samples without a measurable perplexity (``nan``: no target token) are left out of the ranking
    and never kept; the quantiles are those of the measured samples.

    Args:
        num_samples: dataset size N.
        keep_fraction: the selection rate ``r_s`` (kept samples: ``r_s * N`` rounded to a multiple of
            the world size).
        band: ``"low"``, ``"medium"`` or ``"high"`` perplexity.
        score: the store signal holding the perplexities (``reference_perplexity``'s ``name``).
        seed, num_replicas, rank: see :class:`weightwise.selection.base.EpochSampler`.

    Raises:
        ValueError: an unknown band or a ``keep_fraction`` outside (0, 1]; when the pass is recorded,
            scores without ``score`` (the message names ``reference_perplexity``); when selecting, fewer
            measured samples than the band needs.

    Example:
        >>> from weightwise import SampleScoreStore
        >>> sampler = PerplexityBandSampler(8, keep_fraction=0.25, band="medium")
        >>> sampler.attach_scores(SampleScoreStore())
        >>> sampler.record_scores(torch.arange(8), {"perplexity": torch.tensor([9.0, 1, 7, 3, 5, 2, 8, 4])})
        >>> sorted(sampler)  # perplexities 4 and 5: the middle quarter
        [4, 7]
    """

    def __init__(
        self,
        num_samples: int,
        keep_fraction: float = 0.5,
        *,
        band: Band = "high",
        score: str = "perplexity",
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if band not in BANDS:
            raise ValueError(f"band must be one of {BANDS}, got {band!r}")
        super().__init__(
            num_samples,
            keep_fraction,
            score=score,
            warmup_epochs=0,
            scoring="pass",
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
        )
        self.band: Band = band

    def record_scores(self, ids: Tensor, scores: dict[str, Tensor]) -> None:
        if self.score not in scores:
            raise ValueError(
                f"PerplexityBandSampler ranks by {self.score!r}, but the scoring pass returned {sorted(scores)}: score with"
                f" the reference model, DataPruning(score_fn=weightwise.samplers.reference_perplexity(reference_model))"
            )
        super().record_scores(ids, scores)

    def band_positions(self, measured: int) -> tuple[int, int]:
        """The band as ascending-perplexity positions ``[start, stop)`` among ``measured`` samples.

        Raises:
            ValueError: fewer measured samples than the band keeps.
        """
        keep = self.subset_size(self.keep_fraction)
        if keep > measured:
            raise ValueError(
                f"PerplexityBandSampler keeps {keep} samples but only {measured} of {self.num_samples} have a perplexity"
                " (the others have no target token): lower keep_fraction or drop the empty samples"
            )
        start = {"low": 0, "medium": (measured - keep) // 2, "high": measured - keep}[self.band]
        return start, start + keep

    def select(self, scores: Tensor) -> Tensor:
        """Ids of the band's samples (the measured samples' perplexity quantiles)."""
        measured = torch.isfinite(scores).nonzero().squeeze(1)
        start, stop = self.band_positions(measured.numel())
        m = measured.numel()
        # ascending positions [start, stop) are descending ranks [m - stop, m - start)
        return measured[rank_range(scores[measured], m - stop, m - start)]
