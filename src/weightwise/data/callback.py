"""``StreamResume``, the thin Lightning callback over :class:`~weightwise.data.StreamLoader`, and the
warning for a stream that restarts on resume (:func:`warn_if_streams_restart`, given to every Trainer by
:class:`StreamRestartWarning`)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import IterableDataset
from typing_extensions import override

from weightwise.data.stream import StreamLoader
from weightwise.integrations.lightning import restart_train_iterator, resumed_mid_epoch, saved_loader_states


def training_loaders(trainer: pl.Trainer) -> list[Any]:
    """The fit's training loaders (one loader, or any collection of loaders), flattened."""
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    return loaders.flattened if isinstance(loaders, CombinedLoader) else CombinedLoader(loaders).flattened


def stream_loaders(trainer: pl.Trainer) -> list[StreamLoader]:
    """The fit's training ``StreamLoader``s."""
    return [loader for loader in training_loaders(trainer) if isinstance(loader, StreamLoader)]


def warn_if_streams_restart(trainer: pl.Trainer) -> None:
    """Warn, in ``on_train_start`` of a fit resumed mid-epoch, for each training stream that will start
    again from its beginning.

    Lightning saves and restores the state of a training *DataLoader* that has ``state_dict`` and
    ``load_state_dict`` (a :class:`StreamLoader` has them; a dataset's or sampler's are never
    called), and warns for the others only when it knows the epoch's length - never for a stream.
    A plain ``DataLoader`` over an ``IterableDataset`` is made anew and restarts, so the resumed fit
    trains on other rows than the uninterrupted one would have.
    """
    if not resumed_mid_epoch(trainer):
        return
    for loader in training_loaders(trainer):
        dataset = getattr(loader, "dataset", None)
        if isinstance(dataset, IterableDataset) and not (hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")):
            rank_zero_warn(
                f"This fit resumes mid-epoch, and its training stream ({type(dataset).__name__} in a"
                f" {type(loader).__name__}) has no saved position: it starts again from its beginning, so the resumed"
                " run trains on other rows than the uninterrupted one. Lightning saves only a DataLoader's own"
                " state_dict/load_state_dict: for packed documents use weightwise.data.StreamLoader(PackedDocumentStream(...))"
                " with the StreamResume callback.",
                category=UserWarning,
            )


class StreamRestartWarning(Callback):
    """:func:`warn_if_streams_restart` at the start of every fit.

    Attached to every ``Trainer`` by weightwise's ``lightning.pytorch.callbacks_factory`` entry point
    (:func:`weightwise.weighting.guard.guard_factory`), so a stream that will restart on resume is
    named whether or not any other weightwise callback is in the fit.
    """

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warn_if_streams_restart(trainer)


class StreamResume(Callback):
    """Tell every training :class:`~weightwise.data.StreamLoader` when one of its batches starts training.

    Lightning fetches a batch ahead of the one it trains (from a loader without a length), so the
    loader alone cannot tell what a checkpoint should resume after; with this callback its state
    is the batches trained, and a resumed fit continues with exactly the batch that was next.

    It also hands the loaders their saved positions where Lightning does not: when the training
    DataLoader was built before the checkpoint was restored (``trainer.estimated_stepping_batches``
    in ``configure_optimizers``, as step-sized LR schedules do; Lightning issue #20550), Lightning
    keeps the saved states and the stream would silently start again from its beginning.

    Raises:
        MisconfigurationException: (at fit start) no training DataLoader is a ``StreamLoader``; the
            checkpoint holds the states of another number of stateful training DataLoaders.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[StreamResume()], max_steps=1000, logger=False)
    """

    def __init__(self) -> None:
        self._loaders: list[StreamLoader] = []
        self._saved: list[dict[str, Any]] = []

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._saved = saved_loader_states(checkpoint)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loaders = stream_loaders(trainer)
        if not self._loaders:
            raise MisconfigurationException(
                "StreamResume needs a training weightwise.data.StreamLoader: DataLoader(stream, ...) ->"
                " StreamLoader(stream, ...)"
            )
        saved, self._saved = self._saved, []
        if saved and not all(loader.restored for loader in self._loaders):
            self._restore(trainer, saved)
        for loader in self._loaders:
            loader.count_trained_batches()

    @staticmethod
    def _restore(trainer: pl.Trainer, saved: list[dict[str, Any]]) -> None:
        """Load the saved states as Lightning would have (in order, into the DataLoaders with ``state_dict``)."""
        stateful = [loader for loader in training_loaders(trainer) if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")]
        if len(stateful) != len(saved):
            raise MisconfigurationException(
                f"the checkpoint holds the states of {len(saved)} training DataLoaders with state_dict, this fit has"
                f" {len(stateful)}: resume with the DataLoaders that wrote it"
            )
        for loader, state in zip(stateful, saved):
            loader.load_state_dict(state)
        restart_train_iterator(trainer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        for loader in self._loaders:
            loader.batch_trained()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loaders = []
