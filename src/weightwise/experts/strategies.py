"""Where the experts can change mid-fit, and the command that changes them between fits elsewhere.

Upcycling mid-fit changes parameter shapes (E -> m·E experts) or replaces parameters (dense MLP ->
experts and router). Under DDP the module is wrapped anew and the optimizer's state is remapped
in place. Under the sharding strategies the parameters and their optimizer state are split over the
ranks when the fit starts - DeepSpeed ZeRO partitions them into its engine, FSDP2
(``ModelParallelStrategy``) makes each one a sharded DTensor, FSDP flattens them into sharded flat
parameters - so the callbacks refuse there, at fit start, with the one command that does the same
between two fits (``weightwise upcycle --checkpoint``, :mod:`weightwise.cli`). Re-sharding grown
experts and remapping a sharded optimizer's state mid-fit is not done: the references start the
upcycled phase with a fresh optimizer anyway.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from weightwise.integrations.lightning import require_single_device_or_ddp

SHARDING_REASONS: tuple[tuple[type, str, str], ...] = (
    (DeepSpeedStrategy, "DeepSpeed", "ZeRO partitions the parameters into its engine and optimizer when the engine starts"),
    (
        ModelParallelStrategy,
        "ModelParallelStrategy (FSDP2)",
        "fully_shard makes every parameter and its optimizer state a shard per rank",
    ),
    (
        FSDPStrategy,
        "FSDP (FSDPStrategy, FSDP1)",
        "it flattens each wrapped module's parameters into one flat parameter whose shape is fixed when it wraps them",
    ),
)
"""The sharding strategies refused at fit start, with the command that upcycles between fits instead.
``DeepSpeedStrategy`` subclasses ``DDPStrategy``: these are told apart before plain DDP is accepted."""


def require_mid_fit_upcycling(trainer: pl.Trainer, callback: str, model: tuple[str, nn.Module] | None, options: str) -> None:
    """Raise unless the fit can change its experts mid-fit (one device or DDP).

    Args:
        trainer: the fit's trainer.
        callback: the callback's name, for the message.
        model: the transformers model's dotted path in the LightningModule and the model, if found.
        options: the ``weightwise upcycle`` options that do what the callback was asked to.

    Raises:
        MisconfigurationException: a sharding strategy (the message is the command to run between
            fits, with the trainer's checkpoint directory and the model's prefix where known), or
            another strategy the callback does not support.
    """
    command = upcycle_command(trainer, model, options)
    refused = next(((label, why) for kind, label, why in SHARDING_REASONS if isinstance(trainer.strategy, kind)), None)
    if refused is None:
        require_single_device_or_ddp(trainer, callback)
        return
    label, reason = refused
    raise MisconfigurationException(
        f"{callback} cannot run under {label}: {reason}, so the experts cannot change mid-fit. Upcycle between two fits"
        f" instead: train to the step, save a checkpoint, run `{command}` and start the next fit from"
        " AutoModelForCausalLM.from_pretrained(GROWN_DIR) with a fresh optimizer (optimizer state does not cross the fits;"
        " the references also start the upcycled phase with a new optimizer). The next fit may run under any strategy"
        " (e.g. strategy='deepspeed_stage_2' or ModelParallelStrategy); or use strategy='ddp' to upcycle mid-fit."
    )


def transformers_model(pl_module: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost transformers model in ``pl_module`` and its dotted path (``None`` if there is none)."""
    try:
        from transformers import PreTrainedModel  # lazily: importing weightwise costs no transformers
    except ImportError:
        return None
    return next(((path, m) for path, m in pl_module.named_modules() if isinstance(m, PreTrainedModel)), None)


def upcycle_command(trainer: pl.Trainer, model: tuple[str, nn.Module] | None, options: str) -> str:
    """``weightwise upcycle MODEL_DIR GROWN_DIR --checkpoint CKPT --prefix P OPTIONS`` with what the fit knows."""
    source = "MODEL_DIR"
    prefix = "model."
    if model is not None:
        path, module = model
        prefix = f"{path}." if path else ""
        source = getattr(module, "name_or_path", "") or source
    checkpoint = "CHECKPOINT"
    saver = trainer.checkpoint_callback
    if isinstance(saver, ModelCheckpoint) and saver.dirpath is not None:
        checkpoint = f"{saver.dirpath}/{'last.ckpt' if saver.save_last else 'CHECKPOINT'}"
    return f"weightwise upcycle {source} GROWN_DIR --checkpoint {checkpoint} --prefix {prefix!r} {options}"
