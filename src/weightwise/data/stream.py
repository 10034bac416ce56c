"""A packed-document stream that resumes exactly: :class:`PackedDocumentStream` and :class:`StreamLoader`.

What Lightning checkpoints (2.4-2.6, ``FitLoop.on_save_checkpoint``): the ``state_dict()`` of every
*DataLoader* of the fit that has ``state_dict``/``load_state_dict``; on resume it hands each one its
state back before it iterates it. A plain ``DataLoader`` has neither, so a stream restarts from its
beginning. Its dataset's or sampler's methods are never called. So the state lives in
:class:`StreamLoader`, a ``DataLoader``:

* **What the position is.** The number of batches *trained* in the current pass - counted in the
  main process, where Lightning checkpoints - not the number handed out: Lightning fetches one batch
  ahead of the one it trains from a loader without a length, and a checkpoint written in
  ``on_train_batch_end`` would otherwise skip it on resume. The :class:`~weightwise.data.StreamResume`
  callback tells the loader when a batch starts training (a plain loop calls
  :meth:`StreamLoader.batch_trained`).
* **Workers.** A DataLoader with ``W`` workers takes its batches from the workers in turn
  (batch ``g`` of a pass from worker ``g mod W``, each worker packing its own shard). From the
  count of trained batches every worker's shard position follows, and a resumed loader rotates the
  workers' roles so that the next batch comes from the shard that was next. Nothing needs to come
  back from the worker processes.
* **Skipping without reading.** A shard's rows are its documents' tokens back to back, so resuming
  after ``r`` rows skips ``r * seq_len`` tokens; with ``lengths`` given it does so without loading
  the skipped documents.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from weightwise.core.checkpoints import state_version, with_version
from weightwise.data.packing import Document, as_tokens, pack_pieces


def data_parallel_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the given ones, else ``torch.distributed``'s when initialised, else ``(0, 1)``."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class StreamStart:
    """Where an iteration of a :class:`PackedDocumentStream` starts (set by :class:`StreamLoader`).

    Attributes:
        pass_index: the pass over the documents (``loop=False``: each pass is one epoch, shuffled
            with ``seed + pass_index``; ``loop=True``: one endless pass).
        batches: batches of this pass already trained (all workers together).
        batch_size: rows per batch.
        num_workers: the DataLoader's workers (0: the main process).
    """

    pass_index: int = 0
    batches: int = 0
    batch_size: int = 1
    num_workers: int = 0


class PackedDocumentStream(IterableDataset):
    """Documents packed into rows of ``seq_len`` tokens, sharded over ranks and DataLoader workers.

    Each pass shuffles the documents with ``seed + epoch`` (the same order in every process); the
    shard of worker ``w`` of rank ``r`` (``W`` workers per rank, ``R`` ranks) takes every
    ``R * W``-th document of that order, starting at ``r * W + w``, and packs them
    (:func:`weightwise.data.pack_pieces`): rows hold ``input_ids``, ``position_ids`` (0 where each
    piece of a document starts), ``labels`` and ``document_index``. Shards hold disjoint documents;
    the rows depend only on the seed, the documents and the geometry. With ``loop=True`` (default)
    the stream never ends: epoch after epoch, the step budget (``max_steps``) ends the fit and ranks
    never run out at different times under DDP.

    Iterated through a :class:`StreamLoader`, a fit resumed from a Lightning checkpoint continues
    with exactly the rows that were next; through a plain ``DataLoader`` it starts from the beginning.

    Args:
        documents: a sequence of documents (token ids, or bytes); ``documents[i]`` is loaded when
            shard order reaches it, in the process (worker) that packs it.
        seq_len: tokens per row.
        seed: base seed of the per-epoch shuffle.
        loop: start a new epoch when the documents run out.
        rank, world_size: this process' data-parallel rank and the number of ranks; default:
            ``torch.distributed``'s at iteration time.
        lengths: each document's length in tokens, so a resume skips documents without loading them
            (checked against every document that is loaded).

    Raises:
        ValueError: ``seq_len < 2``; no documents; ``lengths`` of another size; (when iterated) fewer
            documents than shards, or a document whose length differs from ``lengths``.

    Example::

        >>> stream = PackedDocumentStream([b"abcdefghij", b"xyz", b"0123456789abc"], seq_len=8, loop=False)
        >>> [bytes(row["input_ids"].tolist()) for row in stream]  # in the order of the seeded shuffle
        [b'01234567', b'89abcabc', b'defghijx']
    """

    def __init__(
        self,
        documents: Sequence[Document],
        seq_len: int,
        *,
        seed: int = 0,
        loop: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        lengths: Sequence[int] | None = None,
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if len(documents) == 0:
            raise ValueError("PackedDocumentStream needs at least one document")
        if lengths is not None and len(lengths) != len(documents):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(documents)} documents")
        self.documents, self.seq_len, self.seed, self.loop = documents, seq_len, seed, loop
        self.rank, self.world_size = rank, world_size
        self.lengths = None if lengths is None else [int(n) for n in lengths]
        self.start = StreamStart()

    def signature(self) -> dict[str, Any]:
        """What a saved position is only valid for: the same documents, packing, shuffle and ranks."""
        return {
            "documents": len(self.documents),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "loop": self.loop,
            "world_size": data_parallel_rank(self.rank, self.world_size)[1],
        }

    def shard_order(self, shard: int, shards: int, epoch: int) -> Iterator[int]:
        """Document indices of ``shard`` from ``epoch`` on (that epoch only unless ``loop``).

        Raises:
            ValueError: fewer documents than shards (a shard would yield nothing).
        """
        if len(self.documents) < shards:
            raise ValueError(f"{len(self.documents)} documents cannot feed {shards} shards (ranks x DataLoader workers)")
        while True:
            order = torch.randperm(len(self.documents), generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from order[shard::shards].tolist()
            if not self.loop:
                return
            epoch += 1

    def pieces(self, shard: int, shards: int, epoch: int, skip_tokens: int = 0) -> Iterator[tuple[int, Tensor]]:
        """``(document index, tokens)`` of ``shard`` in order, after its first ``skip_tokens`` tokens."""
        for index in self.shard_order(shard, shards, epoch):
            known = None if self.lengths is None else self.lengths[index]
            if known is not None and skip_tokens >= known:
                skip_tokens -= known  # skipped without loading it
                continue
            tokens = as_tokens(self.documents[index])
            if known is not None and tokens.numel() != known:
                raise ValueError(f"document {index} has {tokens.numel()} tokens, lengths says {known}")
            if skip_tokens >= tokens.numel():
                skip_tokens -= tokens.numel()
                continue
            yield index, tokens[skip_tokens:]
            skip_tokens = 0

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rank, world_size = data_parallel_rank(self.rank, self.world_size)
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        start = self.start
        if start.batches and max(start.num_workers, 1) != workers:
            raise RuntimeError(
                f"this stream was positioned for {start.num_workers} DataLoader workers but runs in {workers};"
                " iterate it through the StreamLoader that positioned it"
            )
        # Batch g of the pass came from worker role g mod W: the next batch (g = start.batches) must
        # come from this iteration's worker 0, so worker w plays role (w + start.batches) mod W.
        role = (worker + start.batches) % workers
        trained = start.batches // workers + (1 if role < start.batches % workers else 0)
        skip_tokens = trained * start.batch_size * self.seq_len
        shard, shards = rank * workers + role, world_size * workers
        return pack_pieces(self.pieces(shard, shards, start.pass_index, skip_tokens), self.seq_len)


class StreamLoader(DataLoader):
    """A ``DataLoader`` over a :class:`PackedDocumentStream` that Lightning checkpoints and resumes.

    Lightning saves the ``state_dict()`` of every training DataLoader that has one and hands it back
    on resume, before iterating (module docstring). The state is the position of training: the
    pass and the batches trained in it (counted by the :class:`~weightwise.data.StreamResume`
    callback, or by :meth:`batch_trained` in a plain loop). Each iteration continues where training
    stands - after the last trained batch of the pass, or a new pass (``loop=False``) once a pass
    was used up - so an epoch boundary of Lightning's (``limit_train_batches``) does not restart an
    endless stream. Works with ``num_workers > 0`` (non-persistent workers: they are given the
    position at each iteration) and under DDP (every rank trains the same number of batches, so
    the state Lightning saves from rank 0 positions every rank's shards). For validation use a
    plain ``DataLoader`` over a ``loop=False`` stream: each validation then reads the same rows,
    where a ``StreamLoader`` would continue where the last one stopped.

    Args:
        dataset: the stream.
        batch_size: rows per batch (``None``: rows unbatched, one per step).
        **kwargs: the other ``DataLoader`` arguments.

    Raises:
        TypeError: ``dataset`` is not a :class:`PackedDocumentStream`.
        ValueError: ``persistent_workers=True`` with workers (they would keep a stale position).

    Example (a plain loop; in Lightning, add ``StreamResume()`` to the callbacks instead of calling
    ``batch_trained``)::

        >>> stream = PackedDocumentStream([b"abcdefghij", b"xyz", b"0123456789abc"], seq_len=4)
        >>> loader = StreamLoader(stream, batch_size=2)
        >>> batches = iter(loader)
        >>> first = next(batches); loader.batch_trained()
        >>> state = loader.state_dict()                    # what a checkpoint holds
        >>> second = next(batches)["input_ids"]
        >>> resumed = StreamLoader(PackedDocumentStream([b"abcdefghij", b"xyz", b"0123456789abc"], seq_len=4), batch_size=2)
        >>> resumed.load_state_dict(state)
        >>> torch.equal(next(iter(resumed))["input_ids"], second)
        True
    """

    STATE_VERSION = 1

    def __init__(self, dataset: PackedDocumentStream, batch_size: int | None = 1, **kwargs: Any) -> None:
        if not isinstance(dataset, PackedDocumentStream):
            raise TypeError(f"StreamLoader iterates a PackedDocumentStream, got {type(dataset).__name__}")
        if kwargs.get("persistent_workers") and kwargs.get("num_workers", 0) > 0:
            raise ValueError(
                "StreamLoader gives its workers the stream position at every iteration: pass persistent_workers=False"
            )
        super().__init__(dataset, batch_size=batch_size, **kwargs)
        self._next = StreamStart(0, 0)  # where the next iteration starts, while none runs
        self._current: StreamStart | None = None  # the running iteration's start
        self._handed = 0  # batches the running iteration handed out
        self._trained = 0  # of those, batches that started training
        self._exhausted = False
        self._counting = False  # whether anyone reports trained batches
        self.restored = False  # whether a saved position was loaded

    @property
    def rows_per_batch(self) -> int:
        return 1 if self.batch_size is None else int(self.batch_size)

    def position(self) -> StreamStart:
        """Where training stands: the next iteration starts here."""
        current = self._current
        if current is None:
            return self._next
        if self._exhausted and self._trained == self._handed:
            return StreamStart(current.pass_index + 1, 0)
        return StreamStart(current.pass_index, current.batches + self._trained)

    def batch_trained(self) -> None:
        """Count one handed-out batch as trained (``StreamResume`` does this in Lightning).

        Raises:
            RuntimeError: more batches trained than handed out.
        """
        self._counting = True
        if self._trained >= self._handed:
            raise RuntimeError("StreamLoader.batch_trained() called for a batch it has not handed out")
        self._trained += 1

    def count_trained_batches(self) -> None:
        """Declare that trained batches are reported (called by ``StreamResume`` at fit start)."""
        self._counting = True

    def __iter__(self) -> Iterator[Any]:
        position = self.position()
        start = StreamStart(position.pass_index, position.batches, self.rows_per_batch, self.num_workers)
        self.dataset.start = start  # pickled into the workers by the iterator made below
        iterator = super().__iter__()
        self._current, self._handed, self._trained, self._exhausted = start, 0, 0, False
        return self._count(iterator)

    def _count(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._handed += 1
            yield batch
        self._exhausted = True

    def state_dict(self) -> dict[str, Any]:
        """The position of training (pass, batches trained) and what it is valid for.

        Raises:
            RuntimeError: batches were handed out but nobody reports which trained (no
                ``StreamResume`` callback, no :meth:`batch_trained` calls).
        """
        if self._handed and not self._counting:
            raise RuntimeError(
                "StreamLoader cannot tell which of its batches trained: add weightwise.data.StreamResume() to"
                " Trainer(callbacks=[...]) (in a plain loop, call loader.batch_trained() after each step)"
            )
        position = self.position()
        state = {
            "pass": position.pass_index,
            "batches": position.batches,
            "batch_size": self.rows_per_batch,
            "num_workers": self.num_workers,
            "stream": self.dataset.signature(),
        }
        return with_version(state, self.STATE_VERSION)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (before the next iteration).

        Raises:
            ValueError: the state is for other documents, packing, seed, ranks, batch size or workers.
        """
        state_version(state, "StreamLoader", self.STATE_VERSION)
        saved = {"batch_size": state["batch_size"], "num_workers": state["num_workers"], **state["stream"]}
        here = {"batch_size": self.rows_per_batch, "num_workers": self.num_workers, **self.dataset.signature()}
        if saved != here:
            changed = ", ".join(f"{key}={saved[key]!r} (now {here.get(key)!r})" for key in saved if saved[key] != here.get(key))
            raise ValueError(f"this StreamLoader state was saved with {changed}: resume with the same settings")
        self._next = StreamStart(int(state["pass"]), int(state["batches"]))
        self._current = None
        self.restored = True
