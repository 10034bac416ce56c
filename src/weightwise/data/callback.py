"""``StreamResume``: the thin Lightning callback over :class:`~weightwise.data.StreamLoader`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from weightwise.data.stream import StreamLoader


def stream_loaders(trainer: pl.Trainer) -> list[StreamLoader]:
    """The fit's training ``StreamLoader``s (one loader, or any collection of loaders)."""
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    flattened = loaders.flattened if isinstance(loaders, CombinedLoader) else CombinedLoader(loaders).flattened
    return [loader for loader in flattened if isinstance(loader, StreamLoader)]


class StreamResume(Callback):
    """Tell every training :class:`~weightwise.data.StreamLoader` when one of its batches starts training.

    Lightning fetches a batch ahead of the one it trains (from a loader without a length), so the
    loader alone cannot tell what a checkpoint should resume after; with this callback its state
    is the batches trained, and a resumed fit continues with exactly the batch that was next.

    Raises:
        MisconfigurationException: (at fit start) no training DataLoader is a ``StreamLoader``.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[StreamResume()], max_steps=1000, logger=False)
    """

    def __init__(self) -> None:
        self._loaders: list[StreamLoader] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loaders = stream_loaders(trainer)
        if not self._loaders:
            raise MisconfigurationException(
                "StreamResume needs a training weightwise.data.StreamLoader: DataLoader(stream, ...) ->"
                " StreamLoader(stream, ...)"
            )
        for loader in self._loaders:
            loader.count_trained_batches()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        for loader in self._loaders:
            loader.batch_trained()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loaders = []
