"""Trainer defaults for tests, parameter snapshots."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import torch


def trainer(**kwargs) -> pl.Trainer:
    """A quiet CPU ``Trainer``: one device, one epoch, no logger, checkpoint, bar or summary."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def gathered(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Whole parameters inside the block: under ZeRO-3 and FSDP each rank holds shards, so gather them."""
    params = list(module.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    strategy = getattr(getattr(module, "_trainer", None), "strategy", None)
    if type(strategy).__name__.endswith("FSDPStrategy"):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False)
    return contextlib.nullcontext()


def full_parameters(module: torch.nn.Module) -> torch.Tensor:
    """All parameters, whole (a copy), also under ZeRO-3."""
    with gathered(module):
        return flat_params(module).clone()


class Snapshot(pl.Callback):
    """Each layer's parameters at every step, to check that frozen ones never move."""

    def __init__(self):
        self.params = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        layers = pl_module.model.model.layers
        self.params.append([torch.cat([p.detach().flatten() for p in layer.parameters()]).clone() for layer in layers])
