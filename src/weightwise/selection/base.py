"""Epoch samplers that choose which samples an epoch visits and how each one's loss is corrected.

Every policy (InfoBatch, RS2, importance sampling, score-based pruning) answers one question per
epoch - *which sample ids, in which order, with which unbiasing factor* - as an :class:`EpochPlan`.
The base class turns plans into a PyTorch ``Sampler``:

* **Deterministic**: a plan is a function of (seed, epoch, the score store's contents), so every
  rank computes the same plan, and a run resumed from a checkpoint (which restores the store)
  recomputes the same plans. Mid-epoch the store has moved on since the plan was made, so
  ``DataPruning`` checkpoints the epoch's plan and hands it back with :meth:`EpochSampler.resume_epoch`.
* **Distributed by construction** (docs/architecture.md, contract 5): the sampler shards the plan itself -
  rank r takes positions r, r + R, r + 2R, ... - so the ranks' shards are disjoint and together are
  the plan. Lightning must not wrap it in another ``DistributedSampler``:
  ``Trainer(use_distributed_sampler=False)`` (``DataPruning`` checks this and says so).
  Plans whose length is not a multiple of R are padded with their own first samples, as PyTorch's
  ``DistributedSampler`` does, so every rank runs the same number of steps (DDP needs that); the
  subset-choosing policies size their subsets to a multiple of R, so only a full pass over a
  dataset whose size is not a multiple of R repeats samples (at most R - 1).
* **Unbiased**: ``EpochPlan.weights`` holds per-sample loss factors (InfoBatch's ``1/(1-r)``,
  importance sampling's ``1/(N p_i)``); the ``DataPruning`` callback multiplies them into the one
  combined weight (docs/architecture.md, contract 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from weightwise.core import collectives
from weightwise.core.store import FIELDS, SampleScoreStore


def id_dtype(num_samples: int) -> torch.dtype:
    """The narrowest integer type of sample ids: int32 below 2**31 samples (halves a plan's memory -
    8 GB to 4 GB for a permutation of 1e9 ids), int64 above. ``torch.randperm`` draws the same
    permutation in either type."""
    return torch.int32 if num_samples < 2**31 else torch.int64


def check_fraction(name: str, value: float) -> float:
    """Validate a fraction in (0, 1] (subset sizes, mixing weights) and return it."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's decision.

    Attributes:
        indices: sample ids in visiting order (ids may repeat when a policy samples with replacement).
        weights: ``[N]`` loss factor per sample id for this epoch, or ``None`` for all ones.

    Example::

        >>> import torch
        >>> plan = EpochPlan(torch.tensor([3, 0, 2]), weights=torch.tensor([2.0, 1.0, 1.0, 2.0]))
        >>> plan.weights[plan.indices]  # the factor each visited sample's loss gets
        tensor([2., 2., 1.])
    """

    indices: Tensor
    weights: Tensor | None = None


class EpochSampler(collectives.RankAware, Sampler[int]):
    """Base class: a distributed-aware sampler over ``num_samples`` ids driven by per-epoch plans.

    Subclasses implement :meth:`plan_epoch`. The ``DataPruning`` callback attaches the run's
    score store (:meth:`attach_scores`) and calls ``set_epoch`` through Lightning.

    Args:
        num_samples: dataset size N.
        seed: base seed; epoch e draws from ``seed + e``.
        num_replicas: data-parallel world size (default: from ``torch.distributed``, else 1).
        rank: this process' rank (default: from ``torch.distributed``, else 0).

    Raises:
        ValueError: ``num_samples`` not positive.

    Example (a policy is one method: the epoch's ids, and optionally their loss weights)::

        >>> import torch
        >>> class EveryOther(EpochSampler):
        ...     def plan_epoch(self, epoch, generator):
        ...         return EpochPlan(torch.arange(epoch % 2, self.num_samples, 2))
        >>> sampler = EveryOther(6, num_replicas=1, rank=0)
        >>> sampler.set_epoch(1); list(sampler)
        [1, 3, 5]
    """

    def __init__(self, num_samples: int, *, seed: int = 0, num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self._num_replicas = num_replicas
        self._rank = rank
        self.epoch = 0
        self.scores: SampleScoreStore | None = None
        self._plan: EpochPlan | None = None
        self._plan_key: tuple[int, int] | None = None
        self._resumed: tuple[int, EpochPlan] | None = None  # (epoch, plan) restored mid-epoch
        self._skip = 0  # shard positions the next iteration skips (already trained before a resume)

    # -------------------------------------------------------------- policy interface
    def plan_epoch(self, epoch: int, generator: torch.Generator) -> EpochPlan:
        """The plan for ``epoch``; draw all randomness from ``generator`` (seeded ``seed + epoch``)."""
        raise NotImplementedError

    @property
    def store_fields(self) -> tuple[str, ...]:
        """The built-in score-store fields this policy reads (recorded signals are kept anyway)."""
        score = getattr(self, "score", None)
        return (score,) if score in FIELDS else ()

    def needs_scoring(self, epoch: int) -> bool:
        """Whether ``DataPruning`` must run a scoring pass over the whole training set before
        ``epoch`` (:mod:`weightwise.selection.scoring`); the policies that learn from training steps
        never do."""
        return False

    def record_scores(self, ids: Tensor, scores: dict[str, Tensor]) -> None:
        """Take a scoring pass' scores (every rank's) into the attached store."""
        raise NotImplementedError(f"{type(self).__name__} does not use scoring passes")

    def subset_size(self, fraction: float) -> int:
        """``fraction * N`` rounded to a positive multiple of the world size (so shards stay equal)."""
        replicas = self.num_replicas
        largest = (self.num_samples // replicas) * replicas
        if largest == 0:
            raise ValueError(f"{self.num_samples} samples cannot be shared among {replicas} ranks")
        return min(largest, max(replicas, replicas * round(fraction * self.num_samples / replicas)))

    def attach_scores(self, scores: SampleScoreStore) -> None:
        """Give the sampler the run's score store (done by the ``DataPruning`` callback), sized to the dataset."""
        scores.reserve(self.num_samples)
        self.scores = scores
        self._plan = None

    def signal(self, name: str) -> Tensor:
        """``[N]`` scores by name from the attached store; ``nan`` for samples never seen.

        All ``nan`` while no store is attached (before ``DataPruning`` connects one): policies then
        plan as if nothing were known yet, i.e. a full or uniform epoch.
        """
        if self.scores is None or name not in (*self.scores.fields, *self.scores.signal_names):
            return torch.full((self.num_samples,), float("nan"))
        known = self.scores.signal(name)[: self.num_samples].float().cpu()
        if known.numel() == self.num_samples:
            return known  # a view of the store: policies only read it
        values = torch.full((self.num_samples,), float("nan"))
        values[: known.numel()] = known
        return values

    # -------------------------------------------------------------- Sampler protocol
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def plan(self) -> EpochPlan:
        """The current epoch's plan (computed once per epoch and per score-store state)."""
        if self._resumed is not None and self._resumed[0] == self.epoch:
            return self._resumed[1]
        key = (self.epoch, id(self.scores))
        if self._plan is None or self._plan_key != key:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            plan = self.plan_epoch(self.epoch, generator)
            if plan.indices.ndim != 1 or plan.indices.numel() == 0:
                raise RuntimeError(f"{type(self).__name__} planned an empty epoch {self.epoch}")
            self._plan, self._plan_key = plan, key
        return self._plan

    def refresh(self) -> None:
        """Forget the cached plan, so the next access re-plans from the scores as they are now."""
        self._plan = None
        self._resumed = None

    def resume_epoch(self, epoch: int, plan: EpochPlan, consumed: int) -> None:
        """Continue ``epoch`` mid-way after a resume: its saved ``plan`` (the store has changed since
        it was made, so it cannot be re-planned) and the next iteration skips the first ``consumed``
        ids of this rank's shard, which trained before the checkpoint."""
        self._resumed = (epoch, plan)
        self._skip = consumed

    def _shard(self) -> Tensor:
        indices = self.plan.indices
        replicas = self.num_replicas
        remainder = indices.numel() % replicas
        if remainder:
            indices = torch.cat([indices, indices[: replicas - remainder]])
        return indices[self.rank :: replicas]

    def __iter__(self) -> Iterator[int]:
        shard, self._skip = self._shard()[self._skip :], 0
        return _ids_in_chunks(shard)

    def __len__(self) -> int:
        return -(-self.plan.indices.numel() // self.num_replicas)

    def epoch_weights(self) -> Tensor | None:
        """This epoch's ``[N]`` loss factors, or ``None`` when all are 1."""
        return self.plan.weights

    # -------------------------------------------------------------- checkpoints (contract 4)
    def full_epoch(self, generator: torch.Generator) -> EpochPlan:
        """Every sample once, in random order, unweighted."""
        return EpochPlan(torch.randperm(self.num_samples, generator=generator, dtype=id_dtype(self.num_samples)))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint sampler state is for num_samples={state['num_samples']}, seed={state['seed']}; this sampler"
                f" has num_samples={self.num_samples}, seed={self.seed}. Resume with the same dataset and seed."
            )
        self.epoch = int(state["epoch"])
        self._plan = None


def _ids_in_chunks(ids: Tensor, chunk: int = 1 << 16) -> Iterator[int]:
    # Python ints cost ~36 bytes each: convert a chunk at a time, so the epoch lives as an 8-byte tensor.
    for start in range(0, ids.numel(), chunk):
        yield from ids[start : start + chunk].tolist()
