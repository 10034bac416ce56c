"""Logging helpers shared by the callbacks: distributions go to loggers that can show them.

Scalars go through ``LightningModule.log`` and reach every logger. Histograms need the logger's
own API, so they are written for Weights & Biases and TensorBoard and skipped for loggers that
cannot show them (CSV, none): the scalar summaries remain.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor


def log_histogram(trainer: pl.Trainer, name: str, values: Tensor) -> None:
    """Log the distribution of ``values`` at the trainer's global step, from global rank 0 only."""
    if not trainer.is_global_zero or values.numel() == 0:
        return
    values = values.detach().float().cpu()
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({name: wandb.Histogram(values.numpy()), "trainer/global_step": step})
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(name, values, step)
