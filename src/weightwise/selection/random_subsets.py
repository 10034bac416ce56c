"""RS2: repeated sampling of random subsets (Okanovic et al., 2023)."""

from __future__ import annotations

import torch

from weightwise.selection.base import EpochPlan, EpochSampler, check_fraction


class RandomSubsetSampler(EpochSampler):
    """Each epoch trains on a fresh random subset of ``fraction * N`` samples.

    "Repeated Random Sampling for Minimizing the Time-to-Accuracy of Learning", P. Okanovic et al.
    (2023): a per-epoch random subset beats static, score-based subset selection at equal budget,
    at no scoring cost. No loss correction is needed (every sample is equally likely).

    Authors' code: ``PatrikOkanovic/RS2``, ``src/DeepCore/deepcore/methods/uniform_no_replacement.py``
    (and ``uniform.py`` with replacement); ``src/DeepCore/arguments.py``'s ``--fraction`` defaults
    to 0.1, which is the default here.

    * ``replacement=False`` (the paper's default): subsets are consecutive chunks of one random
      permutation of the dataset, a new permutation once it is used up - every sample is seen
      once before any is seen twice.
    * ``replacement=True``: each epoch's subset is drawn independently.

    The window at the end of a pass (a departure, documented): when ``N`` is not a multiple of the
    subset size ``c``, the reference's last window of a permutation wraps to the start of the *same*
    permutation and is one sample short (``end = (end + c) % (N + 1)``: ``c - 1`` samples, the pass'
    last ones then its first ones again), and the next epoch reshuffles. Here every epoch has ``c``
    samples: the pass' last ones, then the first ones of the *next* permutation, which the next
    epoch continues - every epoch the same size, and every sample seen once per pass.

    Args:
        num_samples: dataset size.
        fraction: subset size per epoch as a fraction of N (rounded to a multiple of the world size;
            the reference's 0.1).
        replacement: whether subsets are drawn independently across epochs.
        seed, num_replicas, rank: see :class:`EpochSampler`.

    Raises:
        ValueError: ``fraction`` outside (0, 1], or ``num_samples`` not positive.

    Example::

        >>> sampler = RandomSubsetSampler(100, fraction=0.1, num_replicas=1, rank=0)
        >>> sampler.set_epoch(0); first = set(sampler)
        >>> sampler.set_epoch(1); len(first), len(first & set(sampler))  # no sample twice before all are seen
        (10, 0)
    """

    def __init__(
        self,
        num_samples: int,
        fraction: float = 0.1,
        *,
        replacement: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(num_samples, seed=seed, num_replicas=num_replicas, rank=rank)
        self.fraction = check_fraction("fraction", fraction)
        self.replacement = replacement

    def _permutation(self, round_index: int) -> torch.Tensor:
        # One permutation per pass over the data, independent of the epoch's generator.
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 7919 + round_index))

    def plan_epoch(self, epoch: int, generator: torch.Generator) -> EpochPlan:
        size = self.subset_size(self.fraction)
        if self.replacement:
            return EpochPlan(torch.randperm(self.num_samples, generator=generator)[:size])
        start, n = epoch * size, self.num_samples
        chunks, position = [], start
        while position < start + size:
            round_index, offset = divmod(position, n)
            take = min(n - offset, start + size - position)
            chunks.append(self._permutation(round_index)[offset : offset + take])
            position += take
        return EpochPlan(torch.cat(chunks))
