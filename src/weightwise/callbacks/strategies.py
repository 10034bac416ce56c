"""What the model-changing callbacks need from Lightning's strategy, in one place.

``ExpertUpcycling`` (new parameter shapes) and ``LayerwiseSampling`` (a new set of trainable
parameters) change what the data-parallel wrapper was built for. DDP can simply be wrapped anew.
DeepSpeed's ZeRO flattens and partitions the trainable parameters into its optimizer when the
engine starts: ``ExpertUpcycling`` refuses it, ``LayerwiseSampling`` rebuilds the ZeRO optimizer
(:mod:`weightwise.zero`). ``DeepSpeedStrategy`` is a subclass of ``DDPStrategy``, so it must be
told apart before any ``isinstance(strategy, DDPStrategy)`` test.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException


def require_rewrappable_strategy(trainer: pl.Trainer, callback: str, deepspeed_fix: str) -> None:
    """Raise unless the fit runs on one device or under plain DDP; the message names the way out."""
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise MisconfigurationException(
            f"{callback} cannot run under DeepSpeed: ZeRO partitions the trainable parameters into its optimizer"
            f" when the engine starts, so they cannot change mid-run. {deepspeed_fix}"
        )
    require_single_device_or_ddp(trainer, callback)


def require_single_device_or_ddp(trainer: pl.Trainer, callback: str) -> None:
    """Raise for strategies other than single-device and DDP (the caller has dealt with DeepSpeed)."""
    if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise MisconfigurationException(
            f"{callback} supports single-device, DDP and (where stated) DeepSpeed training, not"
            f" {type(trainer.strategy).__name__}; use strategy='ddp'."
        )


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """Wrap the module in DDP anew: its reducer covers only the parameters that required grad, with
    the shapes they had, when it was built."""
    if isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy.model = trainer.strategy.lightning_module
        trainer.strategy.configure_ddp()
