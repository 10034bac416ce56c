"""Importance sampling by a per-sample score, with unbiased loss weights."""

from __future__ import annotations

import torch

from weightwise.selection.base import EpochPlan, EpochSampler, check_fraction


class ImportanceSampler(EpochSampler):
    """Draw each epoch's samples with probability proportional to a score; weight by ``1/(N p_i)``.

    Katharopoulos & Fleuret, "Not All Samples Are Created Equal: Deep Learning with Importance
    Sampling" (ICML 2018) show that sampling in proportion to (a bound on) the per-sample gradient
    norm minimises the variance of the gradient estimate; PA&DA (Lu et al., CVPR 2023) applies the
    same to per-sample gradient norms during training. With scores ``s_i`` (default: the loss EMA;
    ``"grand"`` or ``"el2n"`` if the training step records them):

        p_i = (1 - eps) * s_i / sum_j s_j + eps / N           (eps = uniform_mix, the floor)

    ``k = fraction * N`` ids are drawn with replacement by systematic sampling (one uniform
    offset u, draws at ``(j + u) / k`` along the cumulative probabilities, taken in a random
    order of the samples): sample i is drawn ``floor(k p_i)`` or ``ceil(k p_i)`` times with
    expectation exactly ``k p_i``, with less variance than k independent draws, in O(N + k).
    A sample drawn more than once appears in consecutive positions, which the rank sharding
    sends to different ranks; on one process its copies may share a batch.
    Each visit's loss is multiplied by ``1 / (N p_i)``, so ``E[sum over draws l_i / (N p_i)] / k =
    mean_j l_j``: the update is unbiased. The floor
    ``eps / N`` keeps every sample reachable and bounds the weights by ``1 / eps``. Samples not
    scored yet get the largest known score (optimism: they are visited soon); the first epoch,
    with no scores, is a uniform pass.

    Args:
        num_samples: dataset size.
        fraction: draws per epoch as a fraction of N (rounded to a multiple of the world size).
        score: store signal (non-negative) to sample by.
        uniform_mix: eps in (0, 1]; 1 is uniform sampling.
        seed, num_replicas, rank: see :class:`EpochSampler`.

    Raises:
        ValueError: a fraction or ``uniform_mix`` outside (0, 1]; when planning, a signal with
            negative values.

    Example (in a Trainer, ``DataPruning`` attaches the store and multiplies ``1 / (N p)`` into the loss)::

        >>> from torch.utils.data import DataLoader
        >>> from weightwise import IndexedDataset
        >>> sampler = ImportanceSampler(1000, fraction=0.5)
        >>> loader = DataLoader(IndexedDataset(list(range(1000))), batch_size=32, sampler=sampler)
        >>> len(sampler)  # half the dataset per epoch
        500
    """

    def __init__(
        self,
        num_samples: int,
        fraction: float = 1.0,
        *,
        score: str = "ema",
        uniform_mix: float = 0.2,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(num_samples, seed=seed, num_replicas=num_replicas, rank=rank)
        self.fraction = check_fraction("fraction", fraction)
        self.score = score
        self.uniform_mix = check_fraction("uniform_mix", uniform_mix)

    def probabilities(self) -> torch.Tensor:
        """``[N]`` sampling probabilities from the current scores (uniform before any score exists)."""
        scores = self.signal(self.score)
        seen = torch.isfinite(scores)
        return self._probabilities(scores, seen) if seen.any() else torch.full((self.num_samples,), 1.0 / self.num_samples)

    def _probabilities(self, scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        n = self.num_samples
        if (scores[seen] < 0).any():
            raise ValueError(f"ImportanceSampler needs non-negative scores; signal {self.score!r} has negative values")
        scores = torch.where(seen, scores, scores[seen].max())
        total = scores.sum()
        proportional = scores / total if total > 0 else torch.full_like(scores, 1.0 / n)
        return (1.0 - self.uniform_mix) * proportional + self.uniform_mix / n

    def plan_epoch(self, epoch: int, generator: torch.Generator) -> EpochPlan:
        size = self.subset_size(self.fraction)
        scores = self.signal(self.score)
        seen = torch.isfinite(scores)
        if not seen.any():
            return EpochPlan(torch.randperm(self.num_samples, generator=generator)[:size])
        p = self._probabilities(scores, seen)
        order = torch.randperm(self.num_samples, generator=generator)
        offset = torch.rand((), generator=generator, dtype=torch.float64)
        # draws of sample order[i]: how many points (j + offset) / size fall in its probability interval
        cumulative = torch.cumsum(p[order], 0, dtype=torch.float64)  # float64: N increments of ~1/N
        boundaries = torch.floor(cumulative / cumulative[-1] * size + offset).long()
        counts = torch.diff(boundaries, prepend=torch.zeros(1, dtype=torch.long) + offset.floor().long())
        indices = torch.repeat_interleave(order, counts)
        return EpochPlan(indices, 1.0 / (self.num_samples * p))
