"""A stream that interleaves one iterable dataset per domain by the current mixture."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from weightwise.core import collectives
from weightwise.mixing.draws import DOMAIN_KEY, EMPTY, Draw, Exhausted, batch_generator, check_options, fill_batch
from weightwise.mixing.table import WeightTable


class MixingStream(collectives.RankAware, IterableDataset):
    """Interleave one iterable per domain, drawing each item's domain by the mixture of the moment.

    Every item (a mapping, e.g. a tokenised, packed row) gets its domain id under ``domain_key``, so
    the batch carries it to the reducer as it carries sample ids. Load it with
    ``DataLoader(stream, batch_size=stream.batch_size)``.

    Sharding: batch ``k`` of rank ``r`` belongs to slot ``w = k mod W`` (``W`` DataLoader workers, at
    least 1), which reads items ``s, s + S, ...`` of every domain, ``s = r W + w`` of ``S = R W``
    (``shard=False``: the domain iterables shard themselves). The DataLoader takes an iterable
    dataset's batches from its workers in turn, so an iterator started at batch ``k0`` gives worker
    ``i`` the slot ``(k0 + i) mod W``, and batch ``k`` comes from its slot's data after a new epoch
    or a resume as well. Batch ``k`` is drawn with the weights of batch ``k`` (``WeightTable``:
    published at known step boundaries, read by the workers through shared memory; a worker waits
    for a version not yet published) and a generator seeded by seed, rank and ``k``: the same
    weights on every rank, different data per rank. ``persistent_workers`` is not supported (a
    worker must start from the positions of the trained batches at each epoch).

    Resume: :class:`~weightwise.mixing.DomainMixing` counts the items of each domain in the trained
    batches per slot; a resumed worker skips that many items of each domain (it iterates over them:
    O(items) once per resume).

    A domain that runs out: ``exhausted="restart"`` (default) iterates it again from its start;
    ``"drop"`` leaves it out for this slot and renormalises the rest; ``"stop"`` ends the stream
    (one process with at most one worker: anything else would end slots at different steps).

    Args:
        datasets: one iterable per domain; a mapping names them.
        batch_size: items per batch; the DataLoader's ``batch_size`` must be the same.
        weights: the fixed mixture used without a callback (default uniform).
        exhausted: ``"restart"``, ``"drop"`` or ``"stop"``.
        draw: ``"sample"`` (each item's domain drawn) or ``"batch"`` (one domain per batch).
        seed: seeds the draws.
        shard: whether the stream splits each domain over the ranks and workers.
        domain_key: the key the domain id is added under.
        num_replicas, rank: the data-parallel world (default: from ``torch.distributed``).

    Raises:
        ValueError: no domains, or bad options.
        TypeError: (on iteration) an item that is not a mapping.

    Example::

        >>> stream = MixingStream({"a": [{"x": 1}] * 4, "b": [{"x": 2}] * 4}, batch_size=2, weights=[1, 0])
        >>> [item["domain_id"] for item in itertools.islice(stream, 3)]
        [0, 0, 0]
    """

    def __init__(
        self,
        datasets: Sequence[Iterable[Any]] | Mapping[str, Iterable[Any]],
        batch_size: int,
        *,
        weights: Sequence[float] | Tensor | None = None,
        exhausted: Exhausted = "restart",
        draw: Draw = "sample",
        seed: int = 0,
        shard: bool = True,
        domain_key: str = DOMAIN_KEY,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        check_options(exhausted, draw, batch_size)
        if isinstance(datasets, Mapping):
            self.names, self.datasets = [str(n) for n in datasets], list(datasets.values())
        else:
            self.datasets = list(datasets)
            self.names = [str(d) for d in range(len(self.datasets))]
        if not self.datasets:
            raise ValueError("MixingStream needs at least one domain")
        k = len(self.datasets)
        self.num_domains = k
        self.table = WeightTable(torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float64), delay=0)
        self.batch_size, self.exhausted, self.draw, self.seed = batch_size, exhausted, draw, seed
        self.shard, self.domain_key = shard, domain_key
        self._num_replicas, self._rank = num_replicas, rank
        self.start_batch = 0  # the batch number the next iteration starts at
        self.slots = 1  # worker slots the positions are kept for (the DataLoader's workers, at least 1)
        self.positions = torch.zeros(1, k, dtype=torch.long)  # [slots, K] items of each domain each slot consumed

    def bind(self, num_workers: int, start_batch: int, positions: Tensor | None = None) -> None:
        """Set where the next iteration starts (done by the callback before the loader's workers start)."""
        self.slots = max(1, num_workers)
        self.positions = self._positions_for(self.slots, self.positions if positions is None else positions.clone())
        self.start_batch = start_batch

    def _positions_for(self, slots: int, positions: Tensor) -> Tensor:
        if positions.shape == (slots, self.num_domains):
            return positions
        if positions.any():
            raise ValueError(
                f"the stream's positions were saved for {positions.shape[0]} DataLoader workers, this run has {slots}:"
                " resume with the same num_workers"
            )
        return torch.zeros(slots, self.num_domains, dtype=torch.long)

    def _domain_items(self, d: int, slot: int, slots: int) -> Iterator[Any]:
        items = iter(self.datasets[d])
        return itertools.islice(items, slot, None, slots) if self.shard else items

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        positions = self._positions_for(workers, self.positions)
        if self.exhausted == "stop" and (workers > 1 or self.num_replicas > 1):
            raise ValueError("exhausted='stop' needs one process and at most one worker; use 'restart' or 'drop'")
        mine = (self.start_batch + worker) % workers  # this worker's slot: batch k belongs to slot k mod W
        slot, slots = self.rank * workers + mine, self.num_replicas * workers
        iterators = [self._domain_items(d, slot, slots) for d in range(self.num_domains)]
        dropped = torch.zeros(self.num_domains, dtype=torch.bool)

        def take(d: int) -> Any:
            item = next(iterators[d], EMPTY)
            if item is EMPTY and self.exhausted == "restart":
                iterators[d] = self._domain_items(d, slot, slots)
                item = next(iterators[d], EMPTY)
                if item is EMPTY:
                    raise ValueError(
                        f"domain {self.names[d]!r} has no item for stream slot {slot} of {slots} (rank {self.rank}, worker"
                        f" {worker}): it holds fewer items than ranks x workers"
                    )
            return item

        for d in range(self.num_domains):  # resume: skip the items the trained batches used
            for _ in range(int(positions[mine, d])):
                if take(d) is EMPTY:
                    dropped[d] = True
                    break
        wait = info is not None
        for k in itertools.count(self.start_batch + worker, workers):
            weights = self.table.weights_for(k, wait=wait)
            generator = batch_generator(self.seed, self.rank, k)
            pairs, ended = fill_batch(weights, dropped, self.batch_size, generator, self.draw, self.exhausted, take)
            for d, item in pairs:
                if not isinstance(item, Mapping):
                    raise TypeError(
                        f"MixingStream adds the domain id to mapping items; domain {self.names[d]!r} yielded a {type(item).__name__}."
                        " Yield dicts, e.g. {'input_ids': ...}."
                    )
                yield {**item, self.domain_key: d}
            if ended:
                return
