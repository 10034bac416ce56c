"""Coverage-centric coreset selection (CCS; Zheng et al., ICLR 2023).

"Coverage-centric Coreset Selection for High Pruning Rates", H. Zheng, R. Liu, F. Lai, A. Prakash
(ICLR 2023); the authors' code ``haizhongzheng/Coverage-centric-coreset-selection``,
``core/data/Coreset.py`` (``CoresetSelection.mislabel_mask`` and ``stratified_sampling``) and
``train.py`` (``--coreset-mode stratified``). At high pruning rates keeping only the hardest
samples (Data Diet's top-k) leaves regions of the data uncovered; CCS keeps samples from the whole
range of difficulty instead:

1. **Hard cutoff** (:func:`coverage_select`'s ``skip_hardest``, the paper's ``beta``, the code's
   ``--mis-ratio``): the ``int(beta * N)`` hardest samples are removed first - with label noise
   most of them are mislabelled.
2. **Stratification**: the remaining samples' score range ``[min, max]`` is cut into
   ``strata = 50`` strata of equal width (:func:`stratify`).
3. **Budget** (:func:`allocate_budget`): ``int(keep_fraction * N)`` samples - relative to the *full*
   dataset, as the code's ``coreset_num = int(coreset_ratio * total_num)`` - are shared among the
   strata from the smallest up: with ``m`` strata still to serve and ``rest`` samples still to give,
   a stratum gets ``min(its size, rest // m)``, so small strata are taken whole and the large ones
   share what is left evenly.
4. **Sampling**: each stratum's budget is drawn uniformly without replacement within it.

Departures from the reference, each named:

* **The score.** The authors always prune by AUM (``mis_key='accumulated_margin'``, low margin =
  hard) and stratify by a key of choice (AUM in their README's CCS command). Here the hard cutoff
  and the strata use one store signal, ``score`` - EL2N from a scoring pass by default (Data
  Diet's), or any signal such as the training-loss EMA (``score="ema"``) - ranked with
  ``hardest="high"`` (larger = harder: EL2N, loss, forgetting) or ``"low"`` (margins such as AUM).
* **Where the scores come from.** The reference scores with training dynamics of a *full* training
  run and then trains a fresh model on the coreset. :class:`CoverageSampler` is a Data Diet
  sampler (:class:`~weightwise.selection.score_pruning.ScorePruningSampler`): ``warmup_epochs`` on
  all data, a forward-only scoring pass, then the coreset for the rest of the run (static), or
  chosen anew every ``rescore_every`` epochs; the warmed-up model continues training.
* **The top stratum edge.** The reference widens the top edge to ``max * 1.0001`` and uses
  half-open strata ``[a, b)``: identical here for ``max > 0``. For ``max <= 0`` (a margin score)
  that edge falls at or below the maximum and the reference silently drops the top samples (all of
  them when every score is 0); here scores at or above the last edge go into the top stratum.
* **Sizes and randomness.** ``int(keep_fraction * N)`` is rounded down to a multiple of the world
  size (equal shards; at least one sample per rank); the strata are sorted by size with a stable
  sort (ties by stratum index; the reference's ``argsort`` leaves ties unspecified); the draws
  within strata come from a generator seeded by ``seed`` and the scoring epoch (the reference uses
  torch's unseeded global generator), so every rank, and a resumed run, selects the same coreset.
* **Unscored samples** (``nan``) rank as the hardest, as everywhere in weightwise: the hard cutoff
  removes them first, and any left after it are not stratified (never kept).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from weightwise.selection.ranking import rank_range
from weightwise.selection.score_pruning import ScorePruningSampler, Scoring
from weightwise.selection.scoring import Averaging

Hardest = Literal["high", "low"]

STRATA = 50
"""The reference's number of strata (``stratas = 50`` in ``stratified_sampling``)."""

_UPPER_EDGE = 1.0001  # the reference's max_score = torch.max(score) * 1.0001


def stratify(scores: Tensor, strata: int = STRATA) -> Tensor:
    """Each score's stratum in ``[0, strata)``: equal-width strata over ``[min, max * 1.0001)``.

    Stratum ``k`` holds the scores in ``[min + k step, min + (k + 1) step)`` with
    ``step = (max * 1.0001 - min) / strata`` (CCS's ``bin_range``); a score at or above the last edge
    (only when ``max <= 0``, see the module docstring) is put in the top stratum, and when all scores
    are equal they all share stratum 0.

    Args:
        scores: ``[n]`` finite scores.
        strata: number of strata.

    Raises:
        ValueError: non-finite scores, an empty tensor or ``strata < 1``.

    Example:
        >>> stratify(torch.tensor([0.0, 1.0, 2.0, 10.0]), strata=5).tolist()
        [0, 0, 0, 4]
    """
    if strata < 1:
        raise ValueError(f"strata must be >= 1, got {strata}")
    if scores.ndim != 1 or scores.numel() == 0 or not torch.isfinite(scores).all():
        raise ValueError("stratify takes a non-empty 1-D tensor of finite scores")
    values = scores if scores.is_floating_point() else scores.double()  # edges in the scores' dtype, as the reference
    low, high = values.min(), values.max()
    upper = high * _UPPER_EDGE if high > 0 else high
    step = (upper - low) / strata
    if step <= 0:
        return torch.zeros(values.numel(), dtype=torch.long)
    edges = low + torch.arange(1, strata, dtype=values.dtype) * step  # the reference's min + k * step
    return torch.bucketize(values, edges, right=True).clamp(max=strata - 1)


def allocate_budget(counts: Tensor, budget: int) -> Tensor:
    """CCS's ``bin_allocate``: ``budget`` samples shared among strata of ``counts`` samples.

    Strata are served from the smallest up (a stable sort); with ``m`` strata left and ``rest``
    samples left to give, the next one gets ``min(its count, rest // m)``.

    Args:
        counts: ``[k]`` samples per stratum.
        budget: samples to allocate (at most ``counts.sum()`` can be).

    Returns:
        ``[k]`` samples to draw from each stratum.

    Raises:
        ValueError: a negative budget or count.

    Example:
        >>> allocate_budget(torch.tensor([1, 10, 3, 6]), 12).tolist()
        [1, 4, 3, 4]
    """
    if budget < 0 or (counts < 0).any():
        raise ValueError(f"budget and counts must be non-negative, got {budget} and {counts.tolist()}")
    order = torch.argsort(counts, stable=True)
    budgets = torch.zeros_like(counts, dtype=torch.long)
    rest = budget
    for served, stratum in enumerate(order.tolist()):
        take = min(int(counts[stratum]), rest // (counts.numel() - served))
        budgets[stratum] = take
        rest -= take
    return budgets


def coverage_select(
    scores: Tensor,
    keep: int,
    *,
    skip_hardest: float = 0.0,
    strata: int = STRATA,
    hardest: Hardest = "high",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The CCS coreset of ``keep`` sample ids (see the module docstring), sorted ascending.

    Args:
        scores: ``[N]`` difficulty scores (``nan``: unscored, ranks as the hardest).
        keep: the coreset size (the reference's ``int(coreset_ratio * N)``).
        skip_hardest: the hard cutoff ``beta``: ``int(beta * N)`` hardest samples removed first.
        strata: number of equal-width strata.
        hardest: ``"high"`` when a larger score is harder (EL2N, loss), ``"low"`` for margins (AUM).
        generator: the random source of the draws within strata.

    Raises:
        ValueError: ``keep`` outside ``[1, N - int(beta N)]``, ``skip_hardest`` outside ``[0, 1)`` or an
            unknown ``hardest``.

    Example:
        >>> scores = torch.arange(10.0)  # 8 and 9 are cut; strata {0, 1, 2}, {3, 4}, {5, 6, 7}: one from each
        >>> chosen = coverage_select(scores, 3, skip_hardest=0.2, strata=3, generator=torch.Generator().manual_seed(0))
        >>> [int(i) // 3 if i < 5 else 2 for i in chosen] == [0, 1, 2] or chosen.tolist()
        True
    """
    if hardest not in ("high", "low"):
        raise ValueError(f"hardest must be 'high' or 'low', got {hardest!r}")
    if not 0.0 <= skip_hardest < 1.0:
        raise ValueError(f"skip_hardest must be in [0, 1), got {skip_hardest}")
    n = scores.numel()
    cut = int(skip_hardest * n)
    if not 1 <= keep <= n - cut:
        raise ValueError(f"keep={keep} must be in [1, {n - cut}]: {n} samples, {cut} of them cut as the hardest")
    keys = scores.double() if hardest == "high" else -scores.double()  # nan stays nan: the hardest either way
    pool = rank_range(keys, cut, n) if cut else torch.arange(n)
    pool = pool[torch.isfinite(keys[pool])]
    if pool.numel() == 0:
        return pool
    stratum = stratify(scores[pool], strata)  # the scores themselves, not the keys: the edges are not symmetric
    counts = torch.bincount(stratum, minlength=strata)
    budgets = allocate_budget(counts, keep)
    chosen = []
    for k in range(strata):
        if budgets[k] > 0:
            members = pool[stratum == k]
            chosen.append(members[torch.randperm(members.numel(), generator=generator)[: int(budgets[k])]])
    return torch.cat(chosen).sort().values if chosen else pool[:0]


class CoverageSampler(ScorePruningSampler):
    """CCS (Zheng et al., ICLR 2023) as a Data Diet-style sampler: a coreset covering every difficulty.

    Warm-up epochs on all data, a forward-only scoring pass (EL2N by default), then the coreset of
    :func:`coverage_select` - the ``skip_hardest`` (β) hardest removed, ``keep_fraction * N``
    samples stratified over 50 equal-width score strata - for the rest of the run, or chosen anew
    after every ``rescore_every`` epochs. Everything but the selection is
    :class:`~weightwise.selection.score_pruning.ScorePruningSampler`'s (scoring passes, averaging,
    checkpointing); see the module docstring for the departures from the reference.

    ``strata=1`` makes it a static uniform random subset of the same size (the papers' "random"
    baseline), scored and chosen at the same moment.

    β: the paper tunes it per pruning rate (the README's CIFAR-10 CCS command at 90% pruning uses
    ``--mis-ratio 0.3``); the reference has no default, so it defaults to 0 here (pure coverage).

    Args:
        num_samples: dataset size N.
        keep_fraction: the coreset's share of the *full* dataset (``int(keep_fraction * N)``, rounded
            down to a multiple of the world size).
        score: the store signal ranked (``"el2n"`` from a pass; ``"ema"``/``"loss"`` from training steps).
        skip_hardest: β, the hard cutoff rate (the code's ``mis_ratio``), a fraction of N.
        strata: the number of strata (the reference's 50).
        hardest: ``"high"`` (larger = harder) or ``"low"`` (margins such as AUM).
        warmup_epochs, rescore_every, scoring, averaging, ema_alpha, ema_std_coef, last_k, seed, num_replicas, rank:
            see :class:`~weightwise.selection.score_pruning.ScorePruningSampler`.

    Raises:
        ValueError: a bad setting (``keep_fraction + skip_hardest > 1``, ``strata < 1``, an unknown
            ``hardest``; the message names it).

    Example:
        >>> from weightwise import SampleScoreStore
        >>> sampler = CoverageSampler(100, keep_fraction=0.1, warmup_epochs=0, strata=5)
        >>> sampler.attach_scores(SampleScoreStore())
        >>> sampler.record_scores(torch.arange(100), {"el2n": torch.linspace(0, 1, 100) ** 4})
        >>> len(list(sampler)), sorted(sampler)[-1] > 90  # 10 samples, the hardest stratum covered too
        (10, True)
    """

    def __init__(
        self,
        num_samples: int,
        keep_fraction: float = 0.5,
        *,
        score: str = "el2n",
        skip_hardest: float = 0.0,
        strata: int = STRATA,
        hardest: Hardest = "high",
        warmup_epochs: int = 1,
        rescore_every: int | None = None,
        scoring: Scoring = "pass",
        averaging: Averaging = "latest",
        ema_alpha: float = 0.8,
        ema_std_coef: float = 1.0,
        last_k: int = 3,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if strata < 1:
            raise ValueError(f"strata must be >= 1, got {strata}")
        if hardest not in ("high", "low"):
            raise ValueError(f"hardest must be 'high' (larger score = harder) or 'low' (margins such as AUM), got {hardest!r}")
        if keep_fraction + skip_hardest > 1.0 + 1e-9:
            raise ValueError(
                f"keep_fraction={keep_fraction} + skip_hardest={skip_hardest} exceeds 1: the coreset is a share of the full"
                " dataset, taken from what is left after the hard cutoff; lower one of them"
            )
        super().__init__(
            num_samples,
            keep_fraction,
            score=score,
            warmup_epochs=warmup_epochs,
            rescore_every=rescore_every,
            skip_hardest=skip_hardest,
            scoring=scoring,
            averaging=averaging,
            ema_alpha=ema_alpha,
            ema_std_coef=ema_std_coef,
            last_k=last_k,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
        )
        self.strata = strata
        self.hardest: Hardest = hardest

    ERROR_RISE = None  # the rising-error warning diagnoses Data Diet's top-k; a coreset spans every difficulty

    def coreset_size(self) -> int:
        """``int(keep_fraction * N)`` rounded down to a positive multiple of the world size."""
        replicas = self.num_replicas
        size = int(self.keep_fraction * self.num_samples) // replicas * replicas
        if size == 0 and self.num_samples >= replicas:
            size = replicas
        if size == 0:
            raise ValueError(f"{self.num_samples} samples cannot be shared among {replicas} ranks")
        return size

    def select(self, scores: Tensor) -> Tensor:
        """The CCS coreset for the scores of the latest scoring (see :func:`coverage_select`)."""
        scored = self._scored_before(self.epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + scored + (1 << 32))
        keep = min(self.coreset_size(), self.num_samples - int(self.skip_hardest * self.num_samples))
        return coverage_select(
            scores, keep, skip_hardest=self.skip_hardest, strata=self.strata, hardest=self.hardest, generator=generator
        )
