"""Sample identity: every batch carries the dataset indices of its samples (docs/architecture.md, contract 2).

Scores must land on the right sample under shuffling, several DataLoader workers, DDP sharding
and gradient accumulation. InfoBatch recovers indices by patching PyTorch's DataLoader iterator,
which breaks across torch versions; weightwise carries the index *in the batch* instead, so the
default collate function moves it along with the data and nothing in PyTorch is patched.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

SAMPLE_ID_KEY = "sample_id"
_TUPLE_PREFIX = "IndexedTuple"


@cache
def indexed_tuple_type(n_fields: int) -> type:
    """The namedtuple ``(field0, ..., field{n-1}, sample_id)`` for items of ``n_fields`` fields.

    A namedtuple, not a plain tuple: PyTorch's default collate keeps its type, so the batch says by
    name which field is the id, and a plain ``(x, y)`` batch whose labels happen to be integers is
    never mistaken for one that carries ids. Unpacking ``x, y, ids = batch`` works as for a tuple.
    """
    cls = namedtuple(f"{_TUPLE_PREFIX}{n_fields}", [*(f"field{i}" for i in range(n_fields)), SAMPLE_ID_KEY])
    cls.__module__ = __name__
    return cls


def __getattr__(name: str) -> type:
    # Lets pickle (DataLoader workers send items to the main process) find IndexedTupleN by name.
    if name.startswith(_TUPLE_PREFIX) and name[len(_TUPLE_PREFIX) :].isdigit():
        return indexed_tuple_type(int(name[len(_TUPLE_PREFIX) :]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that each item carries its own index.

    * A mapping item (``dict``, HF ``BatchEncoding``) gets one more key, ``key`` (default
      ``"sample_id"``), holding the index.
    * Any other item (a tuple ``(x, y)``, a tensor) becomes a namedtuple with the index appended as
      the field ``sample_id``: ``x, y, ids = batch`` still unpacks it, and collation keeps the type.

    Args:
        dataset: any map-style dataset with ``__len__`` and ``__getitem__``.
        key: the mapping key under which the index travels.

    Raises:
        TypeError: ``dataset`` has no ``__len__`` (an iterable dataset yields its own ids, or none).
        KeyError: (on access) a mapping item already has ``key``; pass another ``key=``.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = IndexedDataset(TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])))
        >>> x, y, ids = next(iter(DataLoader(data, batch_size=4)))
        >>> ids
        tensor([0, 1, 2, 3])
    """

    def __init__(self, dataset: Dataset, key: str = SAMPLE_ID_KEY) -> None:
        if not hasattr(dataset, "__len__"):
            raise TypeError(
                "IndexedDataset needs a map-style dataset with __len__; iterable datasets must yield"
                f" their own '{key}' field."
            )
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            if self.key in item:
                raise KeyError(f"the dataset's items already have a '{self.key}' field; pass another key=")
            return {**item, self.key: index}
        fields = tuple(item) if isinstance(item, tuple) else (item,)
        return indexed_tuple_type(len(fields))(*fields, index)


def sample_ids_from_batch(batch: Any, key: str = SAMPLE_ID_KEY) -> Tensor:
    """Return the ``[B]`` integer tensor of dataset indices a batch carries.

    Reads ``batch[key]`` for mapping batches and the field ``key`` of namedtuple batches (the
    layouts that :class:`IndexedDataset` produces after default collation).

    Raises:
        ValueError: the batch carries no integer ids; the message names the fix.
    """
    ids: Any = None
    if isinstance(batch, Mapping):
        ids = batch.get(key)
    elif isinstance(batch, tuple) and key in getattr(batch, "_fields", ()):
        ids = getattr(batch, key)
    if isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
        ids = torch.as_tensor(ids)
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.ndim != 1:
        raise ValueError(
            "weightwise could not find the samples' dataset indices in the batch. Wrap your dataset in"
            f" weightwise.IndexedDataset(dataset) (it adds '{key}' to dict items and appends a '{SAMPLE_ID_KEY}'"
            " field to tuple items), or return {'loss': per_sample_losses, 'sample_ids': ids} from training_step."
        )
    return ids
