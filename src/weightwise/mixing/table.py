"""The mixture each batch is drawn with, by batch number: weights published at known step boundaries.

A loader draws batches ahead of training - Lightning fetches one batch ahead, a ``DataLoader``
with workers keeps ``num_workers * prefetch_factor`` batches in flight, and workers are separate
processes. So "the current weights" is not well defined where a batch is drawn. weightwise fixes
it: micro-batch ``k`` (counted over the whole fit, resumes included) is always drawn with the
weights as they stood after ``k - delay`` micro-batches had trained. The callback publishes the
weights after every micro-batch into a small table in shared memory (a ring of ``capacity`` rows,
``Tensor.share_memory_``), which DataLoader workers read; a reader that needs a version not yet
published waits for it in a worker (``MixingStream``) and raises in the main process, where waiting
would deadlock (the message names ``delay``). The draw therefore does not depend on timing, on the
number of workers in flight or on a resume: every run with the same seed and ``delay`` draws the
same batches (docs/architecture.md, contracts 4 and 5).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from weightwise.mixing.policies import check_weights

WAIT_SECONDS = 600.0
"""How long a DataLoader worker waits for the weights of its batch before giving up."""


class WeightTable:
    """Mixture weights by version (micro-batches trained), shared with DataLoader workers.

    Args:
        initial: the weights of version 0 (before any training).
        delay: batch ``k`` is drawn with version ``max(0, k - delay)``.
        capacity: versions kept (must exceed ``delay`` and the batches a loader draws ahead).

    Raises:
        ValueError: ``delay < 0`` or ``capacity <= delay``.
    """

    def __init__(self, initial: Tensor, delay: int = 1, capacity: int = 1024) -> None:
        if delay < 0 or capacity <= delay:
            raise ValueError(f"delay must be >= 0 and below capacity, got delay={delay}, capacity={capacity}")
        weights = check_weights(initial)
        self.delay, self.capacity = delay, capacity
        self.rows = torch.zeros(capacity, weights.numel(), dtype=torch.float64).share_memory_()
        self.rows[0] = weights
        self._published = torch.zeros(1, dtype=torch.long).share_memory_()  # the newest version
        self.live = False  # a callback publishes versions (else the table is a fixed mixture)

    @property
    def num_domains(self) -> int:
        return self.rows.shape[1]

    @property
    def published(self) -> int:
        """The newest version: the number of micro-batches trained so far in the fit."""
        return int(self._published[0])

    def publish(self, version: int, weights: Tensor) -> None:
        """Record the weights after ``version`` micro-batches (versions come in order)."""
        self.rows[version % self.capacity] = weights.to(torch.float64)
        self._published[0] = version

    def version_for(self, batch: int) -> int:
        return max(0, batch - self.delay) if self.live else 0

    def weights_for(self, batch: int, *, wait: bool) -> Tensor:
        """The weights batch ``batch`` is drawn with.

        Raises:
            RuntimeError: the version is not published yet (in the main process, or after
                :data:`WAIT_SECONDS` in a worker), or already overwritten.
        """
        version = self.version_for(batch)
        deadline = time.monotonic() + WAIT_SECONDS
        while version > self.published:
            if not wait or time.monotonic() > deadline:
                raise RuntimeError(
                    f"batch {batch} is drawn with the mixture after {version} micro-batches (delay={self.delay}), but only"
                    f" {self.published} have trained: the loader draws further ahead than delay allows. Raise delay"
                    " (DomainMixing(delay=...)) to at least the batches in flight: 1 + num_workers * prefetch_factor."
                )
            time.sleep(0.001)
        if version <= self.published - self.capacity:
            raise RuntimeError(
                f"the mixture of version {version} was overwritten; raise the table's capacity above {self.capacity}"
            )
        return self.rows[version % self.capacity].clone()

    def state_dict(self) -> dict[str, Any]:
        newest = self.published
        versions = list(range(max(0, newest - self.delay), newest + 1))
        return {
            "delay": self.delay,
            "published": newest,
            "versions": versions,
            "rows": self.rows[[v % self.capacity for v in versions]].clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["delay"]) != self.delay or state["rows"].shape[1] != self.num_domains:
            raise ValueError(
                f"the checkpoint's mixture table has delay={state['delay']} over {state['rows'].shape[1]} domains; this run has"
                f" delay={self.delay} over {self.num_domains}. Resume with the same delay and domains."
            )
        for version, row in zip(state["versions"], state["rows"]):
            self.rows[version % self.capacity] = row
        self._published[0] = int(state["published"])
