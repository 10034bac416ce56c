"""Score-based pruning: Data Diet (EL2N / GraNd) and its periodic-rescoring variant."""

from __future__ import annotations

from typing import Any

import torch

from weightwise.selection.base import EpochPlan, EpochSampler, check_fraction
from weightwise.selection.ranking import rank_range


class ScorePruningSampler(EpochSampler):
    """Train on the highest-scored fraction of the data, chosen after a full-data warm-up.

    * Static (Paul et al., "Deep Learning on a Data Diet", NeurIPS 2021): train ``warmup_epochs``
      on all data while the training step records a score (EL2N ``||softmax(z) - onehot(y)||``
      or the GraNd bound, :mod:`weightwise.selection.scores`); then keep the ``keep_fraction`` of
      samples with the highest score for the rest of training. ``skip_hardest`` first drops that
      fraction of the very highest scores (Data Diet's offset: with label noise the top scores
      are mostly mislabelled).
    * Dynamic (Attendu & Corbeil, "NLU on Data Diets", 2023): with ``rescore_every=n`` every n-th
      epoch after the warm-up is again a full-data epoch that refreshes every sample's score, and
      the subset is chosen anew after it. Here the rescoring pass is a training epoch on all
      data rather than a separate no-grad pass: the scores come free with the step, and the
      ledger counts the epoch as full.

    The selection is fixed between rescorings and saved in checkpoints. Kept samples are not
    reweighted (the pruned subset is a different, chosen objective, as in the papers).

    Args:
        num_samples: dataset size.
        keep_fraction: fraction of samples kept after scoring (rounded to a multiple of the world size).
        score: store signal to rank by (``"el2n"``, ``"grand"``, or ``"loss"``/``"ema"``).
        warmup_epochs: full-data epochs before the first selection (Data Diet scores early, ~10%).
        rescore_every: ``None`` for static pruning, else the period of full-data rescoring epochs.
        skip_hardest: fraction of the highest-scored samples excluded before keeping.
        seed, num_replicas, rank: see :class:`EpochSampler`.
    """

    def __init__(
        self,
        num_samples: int,
        keep_fraction: float = 0.5,
        *,
        score: str = "el2n",
        warmup_epochs: int = 1,
        rescore_every: int | None = None,
        skip_hardest: float = 0.0,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(num_samples, seed=seed, num_replicas=num_replicas, rank=rank)
        if warmup_epochs < 1:
            raise ValueError("warmup_epochs must be >= 1: scores come from at least one full pass")
        if rescore_every is not None and rescore_every < 2:
            raise ValueError("rescore_every must be >= 2 (1 would mean every epoch is a full pass)")
        self.keep_fraction = check_fraction("keep_fraction", keep_fraction)
        if not 0.0 <= skip_hardest < 1.0 - keep_fraction + 1e-9:
            raise ValueError(f"skip_hardest must be in [0, 1 - keep_fraction], got {skip_hardest}")
        self.score = score
        self.warmup_epochs = warmup_epochs
        self.rescore_every = rescore_every
        self.skip_hardest = skip_hardest
        self._selection: torch.Tensor | None = None
        self._selected_after: int | None = None

    def is_full_epoch(self, epoch: int) -> bool:
        """Warm-up and rescoring epochs visit every sample."""
        if epoch < self.warmup_epochs:
            return True
        since = epoch - self.warmup_epochs
        return self.rescore_every is not None and since > 0 and since % self.rescore_every == 0

    def _last_full_epoch(self, epoch: int) -> int:
        return max(e for e in range(epoch) if self.is_full_epoch(e))

    def plan_epoch(self, epoch: int, generator: torch.Generator) -> EpochPlan:
        if self.is_full_epoch(epoch):
            return self.full_epoch(generator)
        scored_after = self._last_full_epoch(epoch)
        if self._selection is None or self._selected_after != scored_after:
            scores = self.signal(self.score)
            if not torch.isfinite(scores).any():
                return self.full_epoch(generator)  # no store attached yet: nothing to rank by
            self._selection = self.select(scores)
            self._selected_after = scored_after
        order = torch.randperm(self._selection.numel(), generator=generator)
        return EpochPlan(self._selection[order])

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Ids of the kept samples: highest scores after skipping the top ``skip_hardest``."""
        keep = self.subset_size(self.keep_fraction)
        skip = min(round(self.skip_hardest * self.num_samples), self.num_samples - keep)
        return rank_range(scores, skip, skip + keep)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["selection"] = None if self._selection is None else self._selection.clone()
        state["selected_after"] = self._selected_after
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._selection = state["selection"]
        self._selected_after = state["selected_after"]
