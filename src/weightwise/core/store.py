"""The per-sample score store: what the run currently knows about every training sample.

Besides the loss it records any named per-sample signal a ``training_step`` returns (e.g. EL2N or
a gradient-norm bound, see :mod:`weightwise.selection.scores`), so samplers can rank samples by it.

Pruning, importance sampling and reporting read it; the loss reducer writes it once per step with
the *global* batch (every rank's samples), so on every rank it holds the same values and the
decisions taken from it agree (docs/architecture.md, contract 5). It is saved in and restored
from Lightning checkpoints (contract 4).

Memory is O(N): five flat tensors indexed by sample id. An update costs O(B log B) for a batch of
B samples (a sort to drop repeated ids) and never touches the other N - B entries, so a store of
a million samples updates in well under a millisecond of Python (see benchmarks/score_store.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_FIELDS = ("loss", "ema", "weight", "count", "last_step")


class SampleScoreStore:
    """Latest loss, its EMA, the last combined weight, a visit count and the step last seen, per sample.

    Unseen samples hold ``nan`` in ``loss``/``ema``/``weight``, 0 in ``count`` and -1 in
    ``last_step``. The store grows on demand to the largest id it is given (amortised doubling),
    so it needs no dataset length up front; pass ``num_samples`` to allocate once.

    Args:
        num_samples: entries to allocate now (more are added as larger ids arrive).
        ema_decay: ``ema <- decay * ema + (1 - decay) * loss``; the first visit sets ``ema = loss``.
    """

    def __init__(self, num_samples: int = 0, ema_decay: float = 0.9) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.ema_decay = ema_decay
        self._size = num_samples
        self._signals: dict[str, Tensor] = {}
        self._alloc(num_samples, torch.device("cpu"))

    def _alloc(self, capacity: int, device: torch.device) -> None:
        nan = float("nan")
        self._loss = torch.full((capacity,), nan, device=device)
        self._ema = torch.full((capacity,), nan, device=device)
        self._weight = torch.full((capacity,), nan, device=device)
        self._count = torch.zeros(capacity, dtype=torch.long, device=device)
        self._last_step = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self._signals = {name: torch.full((capacity,), nan, device=device) for name in self._signals}

    def __len__(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return self._loss.device

    @property
    def loss(self) -> Tensor:
        """Latest observed loss per sample, ``[N]``."""
        return self._loss[: self._size]

    @property
    def ema(self) -> Tensor:
        """Exponential moving average of the loss per sample, ``[N]``."""
        return self._ema[: self._size]

    @property
    def weight(self) -> Tensor:
        """Combined loss weight the sample last received, ``[N]``."""
        return self._weight[: self._size]

    @property
    def count(self) -> Tensor:
        """How many times each sample has been trained on, ``[N]``."""
        return self._count[: self._size]

    @property
    def last_step(self) -> Tensor:
        """Global step at which each sample was last seen (-1: never), ``[N]``."""
        return self._last_step[: self._size]

    @property
    def signal_names(self) -> list[str]:
        """Names of the extra signals recorded so far (besides loss, ema, weight)."""
        return sorted(self._signals)

    def signal(self, name: str) -> Tensor:
        """A per-sample signal by name, ``[N]``: ``"loss"``, ``"ema"``, ``"weight"`` or a recorded one."""
        if name in ("loss", "ema", "weight"):
            return getattr(self, name)
        if name not in self._signals:
            raise KeyError(
                f"no per-sample signal {name!r} was recorded (have: loss, ema, weight"
                f"{''.join(', ' + n for n in self.signal_names)}). Return it from training_step as"
                f" {{'loss': losses, 'scores': {{{name!r}: values}}}}, e.g. weightwise.losses.el2n(logits, y)."
            )
        return self._signals[name][: self._size]

    def record(self, name: str, sample_ids: Tensor, values: Tensor) -> None:
        """Store a named per-sample signal (latest value wins) for ``sample_ids``."""
        if name in ("loss", "ema", "weight", "count", "last_step"):
            raise ValueError(f"{name!r} is a built-in field; record extra signals under another name")
        if sample_ids.shape != values.shape or sample_ids.ndim != 1:
            raise ValueError(f"signal {name!r}: ids {tuple(sample_ids.shape)} and values {tuple(values.shape)} must be 1-D of one length")
        if sample_ids.numel() == 0:
            return
        ids = sample_ids.to(device=values.device, dtype=torch.long)
        self._ensure(int(ids.max()) + 1, values.device)
        if name not in self._signals:
            self._signals[name] = torch.full((self._loss.numel(),), float("nan"), device=self.device)
        self._signals[name][ids] = values.detach().float()

    @property
    def seen(self) -> Tensor:
        """Boolean mask of samples trained on at least once, ``[N]``."""
        return self.count > 0

    def _ensure(self, size: int, device: torch.device) -> None:
        if device != self.device:
            for name in _FIELDS:
                setattr(self, f"_{name}", getattr(self, f"_{name}").to(device))
            self._signals = {name: values.to(device) for name, values in self._signals.items()}
        capacity = self._loss.numel()
        if size > capacity:
            old = {name: getattr(self, f"_{name}") for name in _FIELDS}
            old_signals = self._signals
            self._alloc(max(size, 2 * capacity), device)
            for name, values in old.items():
                getattr(self, f"_{name}")[:capacity] = values
            for name, values in old_signals.items():
                self._signals[name][:capacity] = values
        self._size = max(self._size, size)

    def update(self, sample_ids: Tensor, losses: Tensor, step: int, weights: Tensor | None = None) -> None:
        """Record one batch: ``losses[i]`` (and ``weights[i]``) observed for ``sample_ids[i]`` at ``step``.

        A sample id repeated within the batch (sampling with replacement) keeps its last
        occurrence and counts once.
        """
        if sample_ids.ndim != 1 or losses.shape != sample_ids.shape:
            raise ValueError(
                f"sample_ids and losses must be 1-D of one length, got {tuple(sample_ids.shape)} and {tuple(losses.shape)}"
            )
        if weights is not None and weights.shape != sample_ids.shape:
            raise ValueError(f"weights must match sample_ids' shape {tuple(sample_ids.shape)}, got {tuple(weights.shape)}")
        if sample_ids.numel() == 0:
            return
        if int(sample_ids.min()) < 0:
            raise ValueError("sample ids must be non-negative dataset indices")
        device = losses.device
        ids = sample_ids.to(device=device, dtype=torch.long)
        losses = losses.detach().float()
        unique_ids, inverse = torch.unique(ids, return_inverse=True)
        if unique_ids.numel() != ids.numel():  # keep each id's last occurrence
            positions = torch.arange(ids.numel(), device=device)
            last = torch.full_like(unique_ids, -1).scatter_reduce(0, inverse, positions, reduce="amax")
            ids, losses = unique_ids, losses[last]
            weights = None if weights is None else weights[last]
        self._ensure(int(ids.max()) + 1, device)

        first_visit = self._count[ids] == 0
        decay = self.ema_decay
        ema = torch.where(first_visit, losses, decay * self._ema[ids] + (1.0 - decay) * losses)
        self._loss[ids] = losses
        self._ema[ids] = ema
        if weights is not None:
            self._weight[ids] = weights.detach().float()
        self._count[ids] += 1
        self._last_step[ids] = step

    def state_dict(self) -> dict[str, Any]:
        """CPU copies of the filled part of every field, and the EMA decay."""
        state: dict[str, Any] = {name: getattr(self, name).cpu().clone() for name in _FIELDS}
        state["signals"] = {name: self.signal(name).cpu().clone() for name in self._signals}
        state["ema_decay"] = self.ema_decay
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`, keeping this store's device."""
        missing = [name for name in (*_FIELDS, "ema_decay") if name not in state]
        if missing:
            raise KeyError(f"score-store state lacks {missing}; was it saved by SampleScoreStore.state_dict()?")
        device = self.device
        self.ema_decay = float(state["ema_decay"])
        self._size = int(state["loss"].numel())
        for name in _FIELDS:
            setattr(self, f"_{name}", state[name].to(device).clone())
        self._signals = {name: values.to(device).clone() for name, values in state.get("signals", {}).items()}
