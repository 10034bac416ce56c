"""The small core every capability builds on: sample identity, the score store, collectives.

* :mod:`~weightwise.core.ids` - batches carry their samples' dataset indices (docs/architecture.md, contract 2).
* :mod:`~weightwise.core.store` - :class:`SampleScoreStore`, per-sample history, equal on every rank.
* :mod:`~weightwise.core.collectives` - gathers and reductions every rank calls in lock-step.
"""

from weightwise.core.ids import SAMPLE_ID_KEY, IndexedDataset, sample_ids_from_batch
from weightwise.core.store import SampleScoreStore

__all__ = ["SAMPLE_ID_KEY", "IndexedDataset", "SampleScoreStore", "sample_ids_from_batch"]
