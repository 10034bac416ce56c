"""What the model-changing callbacks need from Lightning's strategy, in one place.

``ExpertUpcycling`` (new parameter shapes) and ``LayerwiseSampling`` (a new set of trainable
parameters) change what the data-parallel wrapper was built for. DDP can simply be wrapped anew;
DeepSpeed's ZeRO flattens and partitions the trainable parameters into its optimizer when the
engine starts, so neither change can be applied to a running engine. ``DeepSpeedStrategy`` is a
subclass of ``DDPStrategy``, hence the explicit check before the ``isinstance`` test.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException


def require_rewrappable_strategy(trainer: pl.Trainer, callback: str, deepspeed_fix: str) -> None:
    """Raise unless the fit runs on one device or under plain DDP; the message names the way out."""
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        raise MisconfigurationException(
            f"{callback} cannot run under DeepSpeed: ZeRO partitions the trainable parameters into its optimizer"
            f" when the engine starts, so they cannot change mid-run. {deepspeed_fix}"
        )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise MisconfigurationException(
            f"{callback} supports single-device and DDP training, not {type(strategy).__name__}; use strategy='ddp'."
        )


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """Wrap the module in DDP anew: its reducer covers only the parameters that required grad, with
    the shapes they had, when it was built."""
    if isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy.model = trainer.strategy.lightning_module
        trainer.strategy.configure_ddp()
