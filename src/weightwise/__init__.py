"""weightwise: decide, while a model trains, how much each sample, layer and expert matters.

Public API:

* :mod:`weightwise.callbacks` - Lightning callbacks (``LossReweighting``, ...).
* :mod:`weightwise.losses` - pure functions on per-sample losses, usable in any training loop.
* :class:`weightwise.IndexedDataset` - makes every batch carry its samples' dataset indices.
* :class:`weightwise.SampleScoreStore` - per-sample signals (loss, EMA, weight, visits).
"""

from weightwise.core.ids import IndexedDataset, sample_ids_from_batch
from weightwise.core.store import SampleScoreStore

__version__ = "0.2.0"
__all__ = ["IndexedDataset", "SampleScoreStore", "__version__", "sample_ids_from_batch"]
