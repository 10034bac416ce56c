"""A batch sampler over map-style data that draws each batch's domains by the current mixture."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from weightwise.core import collectives
from weightwise.mixing.draws import EMPTY, Draw, Exhausted, batch_generator, check_options, fill_batch
from weightwise.mixing.table import WeightTable


class MixtureBatchSampler(collectives.RankAware, Sampler[list[int]]):
    """Yields batches of dataset indices whose domains are drawn by the mixture of the moment.

    Each sample's domain is drawn from the current weights (``draw="batch"``: one domain per
    micro-batch, ODM's layout), then the next index of that domain is taken from this rank's share
    of the domain's shuffled members. Shares are disjoint: every rank shuffles domain ``d``'s members
    alike (seeded by ``seed``, ``d`` and the domain's pass), rank ``r`` takes positions
    ``r, r + R, ...``. Every rank draws with the same weights and a different generator (seeded by
    seed, rank and batch number, :mod:`weightwise.mixing.draws`). Use it as
    ``DataLoader(IndexedDataset(data), batch_sampler=sampler)`` with
    ``Trainer(use_distributed_sampler=False)``: it shards itself, as ``EpochSampler`` does.

    Without a callback the mixture is fixed (``weights``, default the natural one: each domain's
    share of the samples); :class:`weightwise.mixing.DomainMixing` connects it to a policy.

    A domain whose share is used up: ``exhausted="restart"`` (default) reshuffles it for another
    pass; ``"drop"`` leaves it out and renormalises the rest (per rank: a rank whose share ran out
    first drops it first; the weights stay the same on every rank); ``"stop"`` ends the epoch
    (single process only: ranks would stop at different steps and DDP would hang).

    Args:
        domains: the domain id of every dataset index, ``[N]`` integers in ``[0, K)``.
        batch_size: samples per batch (per rank).
        num_domains: K (default: the largest id + 1).
        names: domain names for logs (default ``"0"``, ``"1"``, ...).
        weights: the fixed mixture used without a callback (default natural).
        exhausted: ``"restart"``, ``"drop"`` or ``"stop"``.
        draw: ``"sample"`` or ``"batch"``.
        num_batches: batches per epoch (default: ``N // (batch_size * R)``).
        seed: seeds the shuffles and the draws.
        num_replicas, rank: the data-parallel world (default: from ``torch.distributed``).

    Raises:
        ValueError: ids outside ``[0, K)``, a domain with fewer samples than ranks, bad options.

    Example::

        >>> import torch
        >>> sampler = MixtureBatchSampler([0, 0, 0, 1, 1, 1], batch_size=2, weights=[1.0, 0.0], num_replicas=1, rank=0)
        >>> batches = list(sampler)
        >>> len(batches), all(i < 3 for batch in batches for i in batch)
        (3, True)
    """

    def __init__(
        self,
        domains: Sequence[int] | Tensor,
        batch_size: int,
        *,
        num_domains: int | None = None,
        names: Sequence[str] | None = None,
        weights: Sequence[float] | Tensor | None = None,
        exhausted: Exhausted = "restart",
        draw: Draw = "sample",
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        check_options(exhausted, draw, batch_size)
        self.domains = torch.as_tensor(domains, dtype=torch.long).flatten()
        if self.domains.numel() == 0 or int(self.domains.min()) < 0:
            raise ValueError("domains must give a non-negative domain id for every dataset index")
        k = num_domains if num_domains is not None else int(self.domains.max()) + 1
        if int(self.domains.max()) >= k:
            raise ValueError(f"domain id {int(self.domains.max())} is outside [0, {k}) (num_domains={k})")
        self.num_domains = k
        self.names = list(names) if names is not None else [str(d) for d in range(k)]
        if len(self.names) != k:
            raise ValueError(f"{len(self.names)} names for {k} domains")
        self.members = [torch.nonzero(self.domains == d).flatten() for d in range(k)]
        self.sizes = torch.tensor([m.numel() for m in self.members], dtype=torch.float64)
        self.table = WeightTable(self.sizes if weights is None else torch.as_tensor(weights, dtype=torch.float64), delay=0)
        self.batch_size, self.exhausted, self.draw, self.seed = batch_size, exhausted, draw, seed
        self._num_replicas, self._rank, self._num_batches = num_replicas, rank, num_batches
        # The cursor: each domain's pass and position in this rank's share; domains dropped.
        self.passes = torch.zeros(k, dtype=torch.long)
        self.positions = torch.zeros(k, dtype=torch.long)
        self.dropped = torch.zeros(k, dtype=torch.bool)
        self.next_batch = 0
        self._snapshots: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._shares: dict[int, tuple[int, Tensor]] = {}

    def __len__(self) -> int:
        if self._num_batches is not None:
            return self._num_batches
        return max(1, self.domains.numel() // (self.batch_size * self.num_replicas))

    # ------------------------------------------------------------------ drawing
    def _share(self, d: int) -> Tensor:
        """This rank's share of domain ``d``'s members in its current pass."""
        cached = self._shares.get(d)
        if cached is None or cached[0] != int(self.passes[d]):
            generator = torch.Generator().manual_seed(hash((self.seed, d, int(self.passes[d]))) & 0x7FFF_FFFF_FFFF_FFFF)
            order = self.members[d][torch.randperm(self.members[d].numel(), generator=generator)]
            cached = (int(self.passes[d]), order[self.rank :: self.num_replicas])
            self._shares[d] = cached
        return cached[1]

    def _take(self, d: int) -> Any:
        share = self._share(d)
        if int(self.positions[d]) >= share.numel():
            if self.exhausted != "restart":
                return EMPTY
            self.passes[d] += 1
            self.positions[d] = 0
            share = self._share(d)
        index = int(share[self.positions[d]])
        self.positions[d] += 1
        return index

    def _check(self) -> None:
        if self.exhausted == "stop" and self.num_replicas > 1:
            raise ValueError(
                "exhausted='stop' would end the ranks' epochs at different steps and hang DDP; use 'restart' or 'drop'"
            )
        small = [d for d in range(self.num_domains) if 0 < self.members[d].numel() < self.num_replicas]
        if small:
            raise ValueError(f"domains {small} have fewer samples than the {self.num_replicas} ranks: every rank needs a share")

    def draw_batch(self, batch: int) -> tuple[list[int], bool]:
        """The indices of batch number ``batch`` (advances the cursor), and whether the epoch ends with it."""
        weights = self.table.weights_for(batch, wait=False)
        generator = batch_generator(self.seed, self.rank, batch)
        pairs, ended = fill_batch(weights, self.dropped, self.batch_size, generator, self.draw, self.exhausted, self._take)
        return [index for _, index in pairs], ended

    def __iter__(self) -> Iterator[list[int]]:
        self._check()
        if self.table.live:  # continue from the first batch not trained yet (prefetched ones are redrawn)
            self.rewind(self.table.published)
        for _ in range(len(self)):
            k = self.next_batch
            self._snapshots[k] = (self.passes.clone(), self.positions.clone(), self.dropped.clone())
            indices, ended = self.draw_batch(k)
            if indices:
                self.next_batch = k + 1
                yield indices
            if ended:
                return

    # ------------------------------------------------------------------ resume (docs/architecture.md, contract 4)
    def rewind(self, batch: int) -> None:
        """Put the cursor back to where it stood before batch ``batch`` was drawn.

        Raises:
            RuntimeError: the sampler never stood there (neither drew nor loaded it).
        """
        if batch == self.next_batch and batch not in self._snapshots:
            return
        if batch not in self._snapshots:
            raise RuntimeError(f"the mixture sampler cannot return to batch {batch}: it never drew it")
        self.passes, self.positions, self.dropped = (t.clone() for t in self._snapshots[batch])
        self.next_batch = batch
        self.release(batch)

    def release(self, batch: int) -> None:
        """Forget the cursors of batches before ``batch`` (they trained)."""
        for old in [b for b in self._snapshots if b < batch]:
            del self._snapshots[old]

    def state_at(self, batch: int) -> dict[str, Any]:
        """The cursor before batch ``batch`` - what a checkpoint taken after ``batch`` micro-batches holds."""
        if batch == self.next_batch and batch not in self._snapshots:
            passes, positions, dropped = self.passes, self.positions, self.dropped
        else:
            passes, positions, dropped = self._snapshots[batch]
        return {
            "batch": batch, "passes": passes.clone(), "positions": positions.clone(), "dropped": dropped.clone(),
            "seed": self.seed, "num_samples": self.domains.numel(), "rank": self.rank,
        }  # fmt: skip

    def load_state(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["num_samples"] != self.domains.numel():
            raise ValueError(
                f"the checkpoint's mixture sampler had seed={state['seed']} over {state['num_samples']} samples; this one has"
                f" seed={self.seed} over {self.domains.numel()}. Resume with the same data and seed."
            )
        batch = int(state["batch"])
        self._snapshots = {batch: (state["passes"].clone(), state["positions"].clone(), state["dropped"].clone())}
        self.rewind(batch)
