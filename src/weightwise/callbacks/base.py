"""Base class of every callback that contributes a factor to the samples' loss weights."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from weightwise.callbacks.reduction import NonFinitePolicy, PerSampleLossReducer
from weightwise.data import SAMPLE_ID_KEY

_CHECKPOINT_KEY = "weightwise"


class SampleWeightCallback(Callback):
    """A Lightning callback that weights samples; all of them share one :class:`PerSampleLossReducer`.

    Subclasses implement :meth:`sample_weights`. The shared reducer multiplies every subclass'
    factor into one weight per sample, reduces the loss, and keeps the score store, which is
    saved in checkpoints under ``checkpoint["weightwise"]``.

    Args:
        nonfinite: ``"raise"`` (default) stops on a NaN/inf per-sample loss with the sample ids;
            ``"drop"`` leaves such samples out of the step and counts them
            (``weightwise/nonfinite_dropped``).
        sample_id_key: the batch key carrying dataset indices (see :class:`weightwise.IndexedDataset`).
    """

    def __init__(self, *, nonfinite: NonFinitePolicy = "raise", sample_id_key: str = SAMPLE_ID_KEY) -> None:
        if nonfinite not in ("raise", "drop"):
            raise ValueError(f"nonfinite must be 'raise' or 'drop', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.sample_id_key = sample_id_key
        self.reducer: PerSampleLossReducer | None = None

    def sample_weights(self, losses: Tensor, sample_ids: Tensor, trainer: pl.Trainer) -> Tensor | None:
        """This callback's factor for each sample of the global batch (``None``: all ones).

        Args:
            losses: ``[B_global]`` finite per-sample losses of every rank, detached.
            sample_ids: ``[B_global]`` their dataset indices.
            trainer: the running trainer.
        """
        raise NotImplementedError

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.reducer = PerSampleLossReducer.install(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.reducer is not None:
            self.reducer.uninstall()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reducer is not None:
            self.reducer.check_gradients_after_drop()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.reducer is not None and _CHECKPOINT_KEY not in checkpoint:
            checkpoint[_CHECKPOINT_KEY] = self.reducer.state_dict()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.reducer is not None and _CHECKPOINT_KEY in checkpoint:
            self.reducer.load_state_dict(checkpoint[_CHECKPOINT_KEY])
