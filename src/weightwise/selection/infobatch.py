"""InfoBatch: unbiased dynamic data pruning by loss (Qin et al., ICLR 2024)."""

from __future__ import annotations

import torch

from weightwise.selection.base import EpochPlan, EpochSampler


class InfoBatchSampler(EpochSampler):
    """Each epoch, randomly skip a fraction of the well-learned samples and up-weight the rest.

    "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning", Z. Qin et al.
    (ICLR 2024). With ``s_i`` the sample's latest loss (from the score store):

    * well-learned samples are those with ``s_i < mean(s)``; each epoch a random fraction ``r``
      (``prune_ratio``) of them is skipped;
    * the kept well-learned samples' losses are multiplied by ``1 / (1 - r)``, so the expected
      gradient over the epoch equals the full-data gradient;
    * from epoch ``anneal * num_epochs`` on (annealing, default delta = 0.875) every sample is
      used again, unweighted, to remove the remaining bias of the schedule;
    * samples never scored yet are always kept (the first epoch is a full pass).

    The kept count is rounded to a multiple of the world size; the factor uses the ratio
    actually pruned, so the correction stays exact.

    Args:
        num_samples: dataset size.
        prune_ratio: r, the fraction of well-learned samples skipped per epoch (paper: 0.5).
        num_epochs: planned epochs (default: ``Trainer(max_epochs)``, set by ``DataPruning``).
        anneal: delta, the fraction of ``num_epochs`` after which all data is used (paper: 0.875).
        score: store signal to rank by (``"loss"``: the latest loss, as in the paper).
        seed, num_replicas, rank: see :class:`EpochSampler`.
    """

    def __init__(
        self,
        num_samples: int,
        prune_ratio: float = 0.5,
        *,
        num_epochs: int | None = None,
        anneal: float = 0.875,
        score: str = "loss",
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(num_samples, seed=seed, num_replicas=num_replicas, rank=rank)
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
        if not 0.0 <= anneal <= 1.0:
            raise ValueError(f"anneal must be in [0, 1], got {anneal}")
        self.prune_ratio = prune_ratio
        self.num_epochs = num_epochs
        self.anneal = anneal
        self.score = score

    def plan_epoch(self, epoch: int, generator: torch.Generator) -> EpochPlan:
        scores = self.signal(self.score)
        seen = torch.isfinite(scores)
        if not seen.any() or self.prune_ratio == 0.0:
            return self.full_epoch(generator)
        if self.num_epochs is None:
            raise ValueError("InfoBatchSampler needs num_epochs (or DataPruning with Trainer(max_epochs=...))")
        if epoch >= self.anneal * self.num_epochs:
            return self.full_epoch(generator)
        well_learned = scores < torch.nanmean(scores)  # nan (never scored) compares False: kept
        n_candidates = int(well_learned.sum())
        wanted_kept = self.num_samples - round(self.prune_ratio * n_candidates)
        n_pruned = self.num_samples - self.subset_size(wanted_kept / self.num_samples)
        n_pruned = min(max(n_pruned, 0), n_candidates)
        # One permutation serves twice: it is the epoch's visiting order, and the first n_pruned
        # well-learned samples met along it are a uniformly random subset of exactly that size.
        order = torch.randperm(self.num_samples, generator=generator)
        candidate_in_order = well_learned[order]
        pruned_in_order = candidate_in_order & (torch.cumsum(candidate_in_order, 0) <= n_pruned)
        factor = n_candidates / (n_candidates - n_pruned) if n_pruned else 1.0
        weights = torch.where(well_learned, factor, 1.0)
        return EpochPlan(order[~pruned_in_order], weights)
