"""A clear error for a per-sample loss that no weightwise callback reduced.

weightwise registers :func:`guard_factory` under Lightning's ``lightning.pytorch.callbacks_factory``
entry point, so every ``Trainer`` gets a :class:`PerSampleLossGuard`. It does nothing for a scalar
loss. For a ``[B]`` loss (a LightningModule written for weightwise, run without its callbacks)
PyTorch would fail with "grad can be implicitly created only for scalar outputs"; the guard
raises first, naming the fix. The same entry point gives every Trainer
:class:`weightwise.data.StreamRestartWarning`: a fit resumed mid-epoch over a stream with no saved
position is told that the stream starts again from its beginning.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override


class PerSampleLossGuard(Callback):
    """Raise before backward when the loss is not a scalar.

    Attached to every Trainer by the entry point (nothing to add by hand).

    Raises:
        ValueError: (before backward) the loss is not a scalar; the message names the callback to add.

    Example::

        >>> import torch
        >>> PerSampleLossGuard().on_before_backward(None, None, torch.ones(4))
        Traceback (most recent call last):
        ...
        ValueError: training_step returned a loss of shape (4,), but only a scalar can be backpropagated. ...
    """

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if loss.ndim != 0:
            raise ValueError(
                f"training_step returned a loss of shape {tuple(loss.shape)}, but only a scalar can be backpropagated."
                " A per-sample loss needs a weightwise callback to reduce it: add"
                " weightwise.callbacks.LossReweighting(strategy='uniform') (plain mean) or another strategy to"
                " Trainer(callbacks=[...]); or return loss.mean() from training_step."
            )


def guard_factory() -> list[Callback]:
    """Entry point for ``lightning.pytorch.callbacks_factory``."""
    from weightwise.data.callback import StreamRestartWarning  # weighting/ does not import data/ at import time

    return [PerSampleLossGuard(), StreamRestartWarning()]
