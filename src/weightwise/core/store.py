"""The per-sample score store: what the run currently knows about every training sample.

Besides the loss it records any named per-sample signal a ``training_step`` or a scoring pass
returns (e.g. EL2N or GraNd, see :mod:`weightwise.selection.scores`), so samplers can rank samples
by it.

Pruning, importance sampling and reporting read it; the loss reducer writes it once per step with
the *global* batch (every rank's samples), so on every rank it holds the same values and the
decisions taken from it agree (docs/architecture.md, contract 5). It is saved in and restored
from Lightning checkpoints (contract 4).

Only what the attached callbacks read is kept, in the precision they need (:data:`FIELDS`): an
InfoBatch run keeps the latest loss, 4 bytes per sample (the official code keeps 8); a run that
also reports samples adds the EMA, the last weight and the visit count. A billion-sample corpus
at 4 bytes per sample is 4 GB on every rank: with ``path=`` the fields live in memory-mapped files
(one set per rank, written in lock-step), so they are paged by the operating system instead of
held in process memory, and every rank still holds - and plans from - the same values.
``DataPruning(score_store_path=...)`` moves a run's store there at train start (:meth:`memory_map`).

An update costs what the batch costs: indexed writes of the batch's entries, and a sort of its ids
only when a field must count a repeated id once (``count``, ``ema``); the other N - B entries are
never touched (see ``benchmarks/score_store.py`` and ``benchmarks/bookkeeping.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from weightwise.core.checkpoints import state_version, with_version

FIELDS: dict[str, torch.dtype] = {
    "loss": torch.float32,  # latest loss (InfoBatch's score)
    "ema": torch.float32,  # exponential moving average of the loss (importance sampling, reports)
    "weight": torch.float16,  # combined weight last received (reports; 3 significant digits suffice)
    "count": torch.int32,  # visits (reports)
    "last_step": torch.int32,  # global step last seen
}
"""The built-in fields and their precision."""

_UNSEEN: dict[str, float] = {"loss": float("nan"), "ema": float("nan"), "weight": float("nan"), "count": 0, "last_step": -1}


class SampleScoreStore:
    """Per-sample history: the built-in ``fields`` that are kept, and named signals.

    Unseen samples hold ``nan`` in ``loss``/``ema``/``weight`` and the signals, 0 in ``count`` and
    -1 in ``last_step``. In memory the store grows on demand to the largest id it is given
    (amortised doubling); pass ``num_samples`` to allocate once. Memory-mapped (``path``), its size
    is fixed at ``num_samples``.

    Args:
        num_samples: entries to allocate now.
        ema_decay: ``ema <- decay * ema + (1 - decay) * loss``; the first visit sets ``ema = loss``.
        fields: the built-in fields to keep (default: all); :meth:`require` adds more later.
        path: a directory for memory-mapped fields (one file per field); ``None``: process memory.

    Raises:
        ValueError: a bad ``ema_decay``, ``num_samples`` or field name, or ``path`` without ``num_samples``.

    Example::

        >>> import torch
        >>> from weightwise import SampleScoreStore
        >>> store = SampleScoreStore(1000, fields=["loss"])
        >>> store.update(torch.tensor([3, 7]), torch.tensor([0.5, 2.0]), step=0)
        >>> store.bytes_per_sample, float(store.loss[7])
        (4, 2.0)
    """

    STATE_VERSION = 1

    def __init__(
        self,
        num_samples: int = 0,
        ema_decay: float = 0.9,
        *,
        fields: Iterable[str] = tuple(FIELDS),
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if path is not None and num_samples == 0:
            raise ValueError("a memory-mapped store needs num_samples= (its files have a fixed size)")
        self.ema_decay = ema_decay
        self.path = None if path is None else Path(path)
        self._size = num_samples
        self._capacity = num_samples
        self._device = torch.device("cpu")
        self._fields: dict[str, Tensor] = {}
        self._signals: dict[str, Tensor] = {}
        self._pending: dict[str, Tensor] = {}  # restored fields not (yet) kept: applied when required
        self.require(*fields)

    # ------------------------------------------------------------------ layout
    def require(self, *fields: str) -> None:
        """Keep these built-in fields from now on (a field added after updates starts unseen).

        Raises:
            ValueError: an unknown field name.
        """
        unknown = [f for f in fields if f not in FIELDS]
        if unknown:
            raise ValueError(f"unknown score-store fields {unknown}; the fields are {list(FIELDS)}")
        for name in fields:
            if name not in self._fields:
                values = self._fields[name] = self._new(name, FIELDS[name], _UNSEEN[name], self._capacity)
                restored = self._pending.pop(name, None)
                if restored is not None:  # from a checkpoint loaded before the callback that reads it asked
                    values[: restored.numel()] = restored.to(device=values.device, dtype=values.dtype)

    def reserve(self, num_samples: int) -> None:
        """Cover ``num_samples`` samples now, at exactly that capacity.

        A store that learns its size from the ids it sees grows by doubling, which can end at up to
        twice the dataset (on the device of the losses, on every rank); whoever knows the dataset's
        length - a sampler attached by ``DataPruning`` - reserves it instead.

        Raises:
            IndexError: more samples than a memory-mapped store's fixed size.
        """
        self._ensure(num_samples, self._device, exact=True)

    def memory_map(self, path: str | os.PathLike[str], num_samples: int | None = None) -> None:
        """Move the kept fields and signals into memory-mapped files under ``path``, keeping their values.

        For a store that a run has already set up (``DataPruning(score_store_path=...)`` calls it at
        train start): from then on the store is paged by the operating system, at a fixed size of
        ``num_samples`` (default: its current length). Store files already in ``path`` are replaced -
        a resumed run's values come from its checkpoint, never from files left by an earlier run.

        Raises:
            ValueError: no size (an empty store and no ``num_samples``), or fewer samples than it holds.
        """
        size = self._size if num_samples is None else num_samples
        if size <= 0 or size < self._size:
            raise ValueError(
                f"a memory-mapped store needs a fixed size covering every sample: got num_samples={num_samples} for a"
                f" store of {self._size} samples"
            )
        target = Path(path)
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob("*.bin"):
            stale.unlink()
        fields, signals, filled = self._fields, self._signals, self._size
        self.path, self._capacity, self._device = target, size, torch.device("cpu")
        self._fields, self._signals = {}, {}
        for name, values in fields.items():
            self._fields[name] = self._new(name, values.dtype, _UNSEEN[name], size)
            self._fields[name][:filled] = values[:filled].cpu()
        for name, values in signals.items():
            self._signals[name] = self._new(f"signal_{name}", torch.float32, float("nan"), size)
            self._signals[name][:filled] = values[:filled].cpu()

    def _new(self, name: str, dtype: torch.dtype, fill: float, capacity: int) -> Tensor:
        if self.path is None:
            return torch.full((capacity,), fill, dtype=dtype, device=self._device)
        self.path.mkdir(parents=True, exist_ok=True)
        file = self.path / f"{name}.bin"
        fresh = not file.exists() or file.stat().st_size != capacity * torch.empty((), dtype=dtype).element_size()
        values = torch.from_file(str(file), shared=True, size=capacity, dtype=dtype)
        if fresh:
            values.fill_(fill)
        return values

    @property
    def fields(self) -> list[str]:
        """The built-in fields kept."""
        return list(self._fields)

    @property
    def bytes_per_sample(self) -> int:
        """Bytes the kept fields and signals take per sample."""
        tensors = [*self._fields.values(), *self._signals.values()]
        return sum(t.element_size() for t in tensors)

    @property
    def nbytes(self) -> int:
        """Bytes the store holds (allocated capacity, which may exceed ``len(self)`` while it grows)."""
        return sum(t.numel() * t.element_size() for t in (*self._fields.values(), *self._signals.values()))

    def __len__(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return self._device

    def _field(self, name: str) -> Tensor:
        values = self._fields.get(name)
        if values is None:
            raise KeyError(
                f"the score store does not keep {name!r} (it keeps {self.fields}): a callback that reads it asks"
                f" for it (store.require({name!r}))"
            )
        return values[: self._size]

    @property
    def loss(self) -> Tensor:
        """Latest observed loss per sample, ``[N]``."""
        return self._field("loss")

    @property
    def ema(self) -> Tensor:
        """Exponential moving average of the loss per sample, ``[N]``."""
        return self._field("ema")

    @property
    def weight(self) -> Tensor:
        """Combined loss weight the sample last received, ``[N]`` (float16)."""
        return self._field("weight")

    @property
    def count(self) -> Tensor:
        """How many times each sample has been trained on, ``[N]``."""
        return self._field("count")

    @property
    def last_step(self) -> Tensor:
        """Global step at which each sample was last seen (-1: never), ``[N]``."""
        return self._field("last_step")

    @property
    def seen(self) -> Tensor:
        """Boolean mask of samples trained on at least once, ``[N]`` (from the visit count, or the
        latest loss or EMA where no count is kept)."""
        for name, mask in (("count", lambda t: t > 0), ("last_step", lambda t: t >= 0), ("loss", torch.isfinite), ("ema", torch.isfinite)):
            if name in self._fields:
                return mask(self._field(name))
        raise KeyError("the score store keeps no field that tells which samples were seen (count, last_step, loss or ema)")

    @property
    def signal_names(self) -> list[str]:
        """Names of the extra signals recorded so far."""
        return sorted(self._signals)

    def signal(self, name: str) -> Tensor:
        """A per-sample signal by name, ``[N]``: a kept field or a recorded signal.

        Raises:
            KeyError: no such field or signal; the message names how to record it.
        """
        if name in FIELDS:
            return self._field(name)
        if name not in self._signals:
            raise KeyError(
                f"no per-sample signal {name!r} was recorded (fields: {', '.join(self.fields)}"
                f"{''.join(', ' + n for n in self.signal_names)}). Return it from training_step as"
                f" {{'loss': losses, 'scores': {{{name!r}: values}}}}, e.g. weightwise.losses.el2n(logits, y)."
            )
        return self._signals[name][: self._size]

    def _ensure(self, size: int, device: torch.device, exact: bool = False) -> None:
        if device != self._device and self.path is None:
            self._fields = {name: values.to(device) for name, values in self._fields.items()}
            self._signals = {name: values.to(device) for name, values in self._signals.items()}
            self._device = device
        if size > self._capacity:
            if self.path is not None:
                raise IndexError(f"sample id {size - 1} is outside the memory-mapped store of {self._capacity} samples")
            capacity = size if exact else max(size, 2 * self._capacity)  # doubling: amortised O(1) per new id
            for table, fills in ((self._fields, _UNSEEN), (self._signals, None)):
                for name, old in table.items():
                    grown = torch.full((capacity,), float("nan") if fills is None else fills[name], dtype=old.dtype, device=old.device)
                    grown[: old.numel()] = old
                    table[name] = grown
            self._capacity = capacity
        self._size = max(self._size, size)

    # ------------------------------------------------------------------ writes
    def record(self, name: str, sample_ids: Tensor, values: Tensor) -> None:
        """Store a named per-sample signal (latest value wins, float32) for ``sample_ids``.

        Raises:
            ValueError: a built-in field's name, or ids and values of different shapes.
        """
        if name in FIELDS:
            raise ValueError(f"{name!r} is a built-in field; record extra signals under another name")
        if sample_ids.shape != values.shape or sample_ids.ndim != 1:
            raise ValueError(f"signal {name!r}: ids {tuple(sample_ids.shape)} and values {tuple(values.shape)} must be 1-D of one length")
        if sample_ids.numel() == 0:
            return
        ids = sample_ids.to(device=values.device, dtype=torch.long)
        self._ensure(int(ids.max()) + 1, values.device)
        if name not in self._signals:
            self._signals[name] = self._new(f"signal_{name}", torch.float32, float("nan"), self._capacity)
        self._signals[name][ids] = values.detach().float().to(self._device)

    def update(self, sample_ids: Tensor, losses: Tensor, step: int, weights: Tensor | None = None) -> None:
        """Record one batch: ``losses[i]`` (and ``weights[i]``) observed for ``sample_ids[i]`` at ``step``.

        A sample id repeated within the batch (sampling with replacement) keeps its last
        occurrence and counts once.

        Raises:
            ValueError: ids, losses and weights of different shapes, or a negative id.
        """
        if sample_ids.ndim != 1 or losses.shape != sample_ids.shape:
            raise ValueError(
                f"sample_ids and losses must be 1-D of one length, got {tuple(sample_ids.shape)} and {tuple(losses.shape)}"
            )
        if weights is not None and weights.shape != sample_ids.shape:
            raise ValueError(f"weights must match sample_ids' shape {tuple(sample_ids.shape)}, got {tuple(weights.shape)}")
        if sample_ids.numel() == 0 or not self._fields:
            return
        device = losses.device if self.path is None else self._device
        ids = sample_ids if sample_ids.dtype == torch.long and sample_ids.device == device else sample_ids.to(device, torch.long)
        low, high = (int(bound) for bound in torch.aminmax(ids))
        if low < 0:
            raise ValueError("sample ids must be non-negative dataset indices")
        self._ensure(high + 1, device)
        losses = losses.detach()
        if losses.dtype != torch.float32 or losses.device != device:
            losses = losses.to(device, torch.float32)
        fields = self._fields
        if "count" in fields or "ema" in fields:  # these must see a repeated id once: keep its last occurrence
            unique_ids, inverse = torch.unique(ids, return_inverse=True)
            if unique_ids.numel() != ids.numel():
                positions = torch.arange(ids.numel(), device=device)
                last = torch.full_like(unique_ids, -1).scatter_reduce(0, inverse, positions, reduce="amax")
                ids, losses = unique_ids, losses[last]
                weights = None if weights is None else weights[last]
        if "ema" in fields:
            previous = fields["ema"][ids]
            decay = self.ema_decay
            fields["ema"][ids] = torch.where(torch.isnan(previous), losses, decay * previous + (1.0 - decay) * losses)
        if "loss" in fields:
            fields["loss"][ids] = losses
        if weights is not None and "weight" in fields:
            fields["weight"][ids] = weights.detach().to(device=device, dtype=fields["weight"].dtype)
        if "count" in fields:
            fields["count"][ids] += 1
        if "last_step" in fields:
            fields["last_step"][ids] = step

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """CPU copies of the filled part of every kept field and signal, and the EMA decay."""
        state: dict[str, Any] = {name: values[: self._size].cpu().clone() for name, values in self._fields.items()}
        state.update({name: values.clone() for name, values in self._pending.items()})  # restored, not read yet
        state["signals"] = {name: self.signal(name).cpu().clone() for name in self._signals}
        state["ema_decay"] = self.ema_decay
        state["size"] = self._size
        return with_version(state, self.STATE_VERSION)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (also weightwise 0.1's layout), keeping this store's device
        and layout. Fields the checkpoint lacks start unseen; fields this store does not keep yet are
        held and filled in when :meth:`require` asks for them (checkpoints are restored before the
        callbacks that read a field have found, e.g., their sampler).

        Raises:
            KeyError: not a score-store state.
        """
        version = state_version(state, "SampleScoreStore", self.STATE_VERSION)
        if "ema_decay" not in state:
            raise KeyError("score-store state lacks 'ema_decay'; was it saved by SampleScoreStore.state_dict()?")
        self.ema_decay = float(state["ema_decay"])
        size = int(state["size"]) if version >= 1 else int(state["loss"].numel())
        if self.path is not None and size > self._capacity:
            raise ValueError(f"the checkpoint's store holds {size} samples, this memory-mapped store {self._capacity}")
        self._size = 0
        self._ensure(size, self._device)
        self._size = size
        for name, values in self._fields.items():
            values.fill_(_UNSEEN[name])
            if name in state:
                values[:size] = state[name].to(device=self._device, dtype=values.dtype)
        self._pending = {name: state[name] for name in FIELDS if name in state and name not in self._fields}
        self._signals = {}
        for name, saved in state.get("signals", {}).items():
            self._signals[name] = self._new(f"signal_{name}", torch.float32, float("nan"), self._capacity)
            self._signals[name][: saved.numel()] = saved.to(self._device)
