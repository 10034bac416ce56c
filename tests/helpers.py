"""Tiny real models and data shared by the tests (a linear classifier on separable Gaussian blobs)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch.utils.data import DataLoader, TensorDataset

from weightwise import IndexedDataset
from weightwise.losses import el2n

N_FEATURES, N_CLASSES = 8, 3


def blobs(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    centers = torch.randn(N_CLASSES, N_FEATURES, generator=gen) * 3
    x = centers[y] + torch.randn(n, N_FEATURES, generator=gen)
    return TensorDataset(x, y)


def indexed_loader(n: int = 64, batch_size: int = 8, shuffle: bool = False, seed: int = 0, sampler=None) -> DataLoader:
    return DataLoader(IndexedDataset(blobs(n, seed)), batch_size=batch_size, shuffle=shuffle, sampler=sampler)


class Classifier(pl.LightningModule):
    """``per_sample=True``: returns the unreduced loss ``[B]`` (weightwise style); else the mean."""

    def __init__(self, per_sample: bool = True, lr: float = 0.1, optimizer: str = "sgd", el2n: bool = False) -> None:
        super().__init__()
        self.per_sample = per_sample
        self.el2n = el2n
        self.lr = lr
        self.optimizer = optimizer
        self.net = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, N_CLASSES))

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self.net(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        if self.el2n:
            return {"loss": losses, "scores": {"el2n": el2n(logits, y)}}
        return losses if self.per_sample else losses.mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer(**kwargs) -> pl.Trainer:
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



class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's real ``DeepSpeedStrategy`` (ZeRO-``stage``), made to run on CPU with gloo.

    Lightning refuses DeepSpeed without CUDA only in its device plumbing; DeepSpeed's ZeRO engines
    themselves run on CPU. Three overrides bridge that for the tests: no CUDA check, CPU devices
    carry the local rank as their index (DeepSpeed reads it), and the distributed setup skips the
    CUDA device-index validation. Everything else - engine, ZeRO optimizer, partitioning, sharded
    checkpoints - is DeepSpeed's and Lightning's own code. Usable from a LightningCLI config as
    ``trainer.strategy: {class_path: helpers.CPUDeepSpeedStrategy, init_args: {stage: 2}}``.
    """

    def __init__(self, stage: int = 2, param_persistence_threshold: int | None = None, **kwargs) -> None:
        super().__init__(stage=stage, process_group_backend="gloo", **kwargs)
        if param_persistence_threshold is not None:  # ZeRO-3 keeps parameters below it whole on every rank
            self.config["zero_optimization"]["stage3_param_persistence_threshold"] = param_persistence_threshold

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
