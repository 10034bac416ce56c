"""What weightwise needs from Lightning beyond its public callback API, in one place.

Private pieces used (checked by :func:`check_trainer` when a callback is set up; tested with
Lightning 2.4-2.6):

* ``trainer._logger_connector.should_update_logs`` - whether this step writes logs
  (``log_every_n_steps``); ``LightningModule.log`` costs ~1.5 ms a metric on CPU, more than a
  small model's step, so per-step values are computed only on logging steps.
* ``trainer.fit_loop.max_batches`` - the epoch length Lightning sized once from the first epoch;
  a pruned epoch is shorter (:func:`set_epoch_length`).
* ``DistributedSamplerWrapper``'s ``dataset._sampler`` - the sampler Lightning wrapped, to refuse a
  weightwise sampler sharded twice with an error naming the fix (:func:`distributed_wrapped_sampler`).
* ``trainer.fit_loop._data_fetcher`` / ``_combined_loader`` and ``fit_loop.epoch_loop.reset`` - a
  sampler planned in ``on_train_start`` or the first ``on_train_epoch_start`` of a fit (a scoring
  pass, a restored mid-epoch plan) needs the training iterator made anew (DataLoader workers drew
  indices when ``FitLoop.setup_data`` made it), and Lightning's "dataloader is not resumable"
  warning, raised in that ``reset`` for a DataLoader without ``state_dict``, does not apply to a
  sampler that resumes (:func:`sampler_planned`).
* ``fit_loop.restarting``, ``fit_loop.epoch_progress`` and ``fit_loop.epoch_loop.batch_progress``
  (the loops' progress counters, restored from the checkpoint) - whether a fit resumes in the
  middle of an epoch (:func:`resumed_mid_epoch`).
* the checkpoint's ``loops.fit_loop.state_dict.combined_loader`` - the training DataLoaders' saved
  states, which Lightning does not hand back when the DataLoader was built before the checkpoint
  was restored (``trainer.estimated_stepping_batches`` in ``configure_optimizers``, Lightning issue
  #20550) (:func:`saved_loader_states`).

Methods replaced on live objects, for one fit, as instance attributes (the classes are untouched
and :meth:`MethodPatch.restore` puts the originals back at teardown):

* ``LightningModule.training_step`` - the reducer turns its per-sample losses into the scalar
  Lightning backpropagates; no callback hook sits between the two.
* ``LightningModule.configure_optimizers`` and ``DeepSpeedStrategy.load_checkpoint`` - layer
  sampling under ZeRO must freeze layers before DeepSpeed builds its engine and rebuild the ZeRO
  optimizer before DeepSpeed loads its shards (:mod:`weightwise.integrations.deepspeed`).
* ``ModelParallelStrategy.load_checkpoint`` - it loads the optimizer through
  ``torch.distributed.checkpoint``, whose template (``get_optimizer_state_dict``) gives state to
  every parameter that requires grad; layer sampling first makes exactly the parameters that held
  state when the checkpoint was written require grad (:func:`model_parallel_checkpoint_meta` reads
  the callback states Lightning wrote beside the shards).
* ``LightningModule.on_load_checkpoint`` - expert upcycling grows the module before Lightning
  loads a checkpoint written after the surgery.

Strategies: ``DeepSpeedStrategy`` subclasses ``DDPStrategy``, so it is told apart first
(:func:`is_deepspeed`); ``ModelParallelStrategy`` (FSDP2, per-parameter DTensors) is
:func:`is_model_parallel`; after the trainable parameters or their shapes change, DDP is wrapped anew
(:func:`rewrap_ddp`).
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from weightwise.integrations.versions import require

MINIMUM = "2.4"
TESTED = ">=2.4,<2.7"


def check_trainer(trainer: pl.Trainer) -> None:
    """Raise, naming the versions, if this Lightning lacks a private piece weightwise uses.

    Raises:
        UnsupportedVersionError: a piece is missing (a Lightning release that moved it).
    """
    missing = []
    if not hasattr(getattr(trainer, "_logger_connector", None), "should_update_logs"):
        missing.append("Trainer._logger_connector.should_update_logs")
    if not hasattr(trainer.fit_loop, "max_batches"):
        missing.append("Trainer.fit_loop.max_batches")
    if not _wrapped_sampler_is_readable():
        missing.append("DistributedSamplerWrapper's dataset._sampler")
    if not all(hasattr(trainer.fit_loop, name) for name in ("_data_fetcher", "_combined_loader")):
        missing.append("Trainer.fit_loop._data_fetcher and _combined_loader")
    require("lightning", MINIMUM, TESTED, missing, purpose="weightwise's Lightning callbacks")
    warn_if_deepspeed_divides_twice(trainer)


class DeepSpeedAccumulationWarning(UserWarning):
    """Lightning's DeepSpeed strategy divides an accumulated micro-batch loss twice (see
    :class:`DeepSpeedLossDividedOnce`)."""


class DeepSpeedLossDividedOnce(DeepSpeedPrecision):
    """Lightning's DeepSpeed precision, with each micro-batch's loss divided by the accumulation steps once.

    Lightning's automatic optimization divides each micro-batch's loss by ``accumulate_grad_batches``
    and then calls ``DeepSpeedEngine.backward``, which divides it again by
    ``gradient_accumulation_steps`` (its ``scale_wrt_gas=True`` default; Lightning sets that to
    ``accumulate_grad_batches``): with k micro-batches the gradients are 1/k of DDP's (measured with
    Lightning 2.6.6 and DeepSpeed 0.19.8: SGD updates 0.5x at k = 2, ZeRO-2 on 2 ranks; Lightning issue
    #6170 reports the symptom). Adam is nearly blind to the scale; SGD, gradient clipping, logged
    gradient norms and weight decay relative to the update are not. ``scale_wrt_gas=False`` leaves
    Lightning's division the only one, so DeepSpeed trains like DDP (tested on 2 ranks under ZeRO-2
    and ZeRO-3 with every weightwise callback that carries accumulation).

    Example::

        strategy = DeepSpeedStrategy(stage=2, precision_plugin=DeepSpeedLossDividedOnce("bf16-mixed"))
    """

    def backward(self, tensor: torch.Tensor, model: pl.LightningModule, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("scale_wrt_gas", False)
        super().backward(tensor, model, optimizer, *args, **kwargs)


def warn_if_deepspeed_divides_twice(trainer: pl.Trainer) -> None:
    """Warn (:class:`DeepSpeedAccumulationWarning`) when the fit runs Lightning's DeepSpeed strategy with
    ``accumulate_grad_batches > 1`` and its own precision plugin: the gradients are 1/k of DDP's."""
    if not is_deepspeed(trainer) or trainer.accumulate_grad_batches <= 1:
        return
    if isinstance(trainer.strategy.precision_plugin, DeepSpeedLossDividedOnce):
        return
    k = trainer.accumulate_grad_batches
    warnings.warn(
        f"Under Lightning's DeepSpeedStrategy with accumulate_grad_batches={k}, each micro-batch's loss is divided by"
        f" {k} twice (by Lightning, then by DeepSpeedEngine.backward), so the gradients are 1/{k} of DDP's. Pass"
        " precision_plugin=weightwise.integrations.lightning.DeepSpeedLossDividedOnce(<precision>) to the"
        " DeepSpeedStrategy to divide once.",
        DeepSpeedAccumulationWarning,
        stacklevel=2,
    )


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes step-level logs at this step (``log_every_n_steps``)."""
    return bool(trainer._logger_connector.should_update_logs)


def set_epoch_length(trainer: pl.Trainer, batches: int) -> None:
    """Tell the fit loop, the progress bar and ``val_check_interval`` that this epoch has ``batches``.

    Lightning sizes the epoch once, from the first epoch's length (``FitLoop.setup_data``); a
    pruned epoch is shorter.
    """
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif limit is not None and limit < 1.0:
        batches = max(1, int(batches * limit))
    trainer.fit_loop.max_batches = batches
    if isinstance(trainer.val_check_interval, float) and trainer.val_check_batch not in (None, float("inf")):
        trainer.val_check_batch = max(1, int(batches * trainer.val_check_interval))


class MethodPatch:
    """A method of a live object replaced by a wrapper for one fit; :meth:`restore` undoes it.

    The wrapper is set as an instance attribute, so the class - and every other instance - keeps
    the original, and pickling the object after :meth:`restore` sees nothing of weightwise.
    """

    def __init__(self, owner: object, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        if name in vars(owner):
            raise RuntimeError(f"{type(owner).__name__}.{name} is already replaced on this instance")
        original = getattr(owner, name)
        self.owner, self.name = owner, name
        setattr(owner, name, functools.wraps(original)(make_wrapper(original)))

    def restore(self) -> None:
        """Remove the wrapper (safe to call more than once)."""
        vars(self.owner).pop(self.name, None)


def distributed_wrapped_sampler(sampler: object) -> object | None:
    """The sampler inside Lightning's ``DistributedSamplerWrapper`` (its dataset's private ``_sampler``),
    or ``None`` when ``sampler`` is not such a wrapper."""
    return getattr(getattr(sampler, "dataset", None), "_sampler", None)


@functools.cache
def _wrapped_sampler_is_readable() -> bool:
    """Whether :func:`distributed_wrapped_sampler` finds the sampler in this Lightning's wrapper (probed
    once per process: it is a property of the installed Lightning, and every callback's setup asks)."""
    return distributed_wrapped_sampler(DistributedSamplerWrapper([0], num_replicas=1, rank=0)) == [0]


def is_deepspeed(trainer: pl.Trainer) -> bool:
    return isinstance(trainer.strategy, DeepSpeedStrategy)


def is_fsdp(trainer: pl.Trainer) -> bool:
    return isinstance(trainer.strategy, FSDPStrategy)


def is_model_parallel(trainer: pl.Trainer) -> bool:
    """``ModelParallelStrategy``: FSDP2 (``fully_shard`` in ``configure_model``), per-parameter DTensors."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def model_parallel_checkpoint_meta(checkpoint_path: str | Path) -> dict[str, Any]:
    """What ``ModelParallelStrategy`` saved beside the model and optimizer: a sharded checkpoint's
    ``meta.pt`` (rank 0's callback states, loops, ...), or the whole single-file checkpoint."""
    path = Path(checkpoint_path)
    return torch.load(path / "meta.pt" if path.is_dir() else path, map_location="cpu", weights_only=False, mmap=not path.is_dir())


@contextlib.contextmanager
def parameters_for_direct_forward(trainer: pl.Trainer) -> Iterator[None]:
    """Inside the block, the LightningModule can run a forward outside Lightning's training step
    (a scoring pass, IST's probes, a block-influence measurement): FSDP1's sharded flat parameters
    are gathered for it (``summon_full_params``, the whole model on every rank for the block);
    ZeRO-3 and FSDP2 (``fully_shard``) gather by their own module hooks, DDP and one device need
    nothing."""
    if is_fsdp(trainer):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            yield
    else:
        yield


def fsdp_keeps_original_parameters(trainer: pl.Trainer) -> bool:
    """Whether ``FSDPStrategy`` wraps with ``use_orig_params=True`` (Lightning passes its extra
    keyword arguments to FSDP through ``strategy.kwargs``)."""
    return bool(getattr(trainer.strategy, "kwargs", {}).get("use_orig_params"))


def layers_sharing_an_fsdp_unit(stack: Iterable[torch.nn.Module]) -> list[int]:
    """The indices of the layers that are not an FSDP1 unit of their own (FSDP's ``auto_wrap_policy``
    with the layer class makes each one a ``FullyShardedDataParallel`` module): their parameters share
    a flat parameter, and with it a gradient, with other parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [i for i, layer in enumerate(stack) if not isinstance(layer, FullyShardedDataParallel)]


def require_single_device_or_ddp(trainer: pl.Trainer, callback: str) -> None:
    """Raise for strategies other than single-device and DDP (the caller has dealt with the sharded
    strategies it supports).

    Raises:
        MisconfigurationException: any other strategy.
    """
    if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise MisconfigurationException(
            f"{callback} supports single-device, DDP and (where stated) DeepSpeed, FSDP and ModelParallelStrategy"
            f" training, not {type(trainer.strategy).__name__}; use strategy='ddp'."
        )


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """Wrap the module in DDP anew: its reducer covers only the parameters that required grad, with
    the shapes they had, when it was built. A no-op on one device."""
    if isinstance(trainer.strategy, DDPStrategy) and not is_deepspeed(trainer):
        trainer.strategy.model = trainer.strategy.lightning_module
        trainer.strategy.configure_ddp()


def restart_train_iterator(trainer: pl.Trainer) -> None:
    """Make the training iterator anew (in ``on_train_start``: Lightning made it in ``FitLoop.setup_data``),
    so that loaders positioned since then are iterated from their new position; a batch Lightning had
    fetched ahead from the old iterator is dropped with it."""
    fit_loop = trainer.fit_loop
    if fit_loop._data_fetcher is not None and fit_loop._combined_loader is not None:
        fit_loop._combined_loader.reset()  # drops the iterator: its workers shut down
        iter(fit_loop._data_fetcher)


def saved_loader_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The training DataLoaders' states in a Lightning checkpoint (``FitLoop.on_save_checkpoint`` writes
    them under ``loops.fit_loop.state_dict.combined_loader``, one per DataLoader with ``state_dict``)."""
    return list(checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader", []))


NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable"
"""The start of the warning Lightning's ``_TrainingEpochLoop.reset`` gives when a fit resumes mid-epoch and a
training DataLoader lacks ``state_dict``/``load_state_dict`` (Lightning checks the DataLoader, never its sampler)."""


def sampler_planned(trainer: pl.Trainer, *, restored_mid_epoch: bool = False) -> None:
    """Call after a callback (re)planned the training sampler for the coming epoch, in ``on_train_start``
    or ``on_train_epoch_start``.

    * Lightning makes an epoch's iterator after ``on_train_epoch_start``, except in the first epoch
      of a fit and on a restart, where ``FitLoop.setup_data`` made it before ``on_train_start``:
      DataLoader workers drew their first batches of indices from the sampler right then, from the
      plan as it was (before a scoring pass, a restored mid-epoch plan). There the iterator is made
      anew; nothing has been taken from it (Lightning prefetches only loaders without a length).
    * ``restored_mid_epoch``: the sampler was given back its mid-epoch position, so Lightning's
      warning that the DataLoader "is not resumable" does not apply: the next ``reset`` of the
      epoch loop, where Lightning gives it, runs with it ignored (the replacement removes itself).
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if trainer.current_epoch == 0 or epoch_loop.restarting:
        restart_train_iterator(trainer)
    if not restored_mid_epoch or "reset" in vars(epoch_loop):
        return

    def once_without_warning(original: Callable[..., Any]) -> Callable[..., Any]:
        def reset(*args: Any, **kwargs: Any) -> Any:
            patch.restore()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=re.escape(NOT_RESUMABLE_WARNING), category=PossibleUserWarning)
                return original(*args, **kwargs)

        return reset

    patch = MethodPatch(epoch_loop, "reset", once_without_warning)


def resumed_mid_epoch(trainer: pl.Trainer) -> bool:
    """Whether this fit resumes from a checkpoint written inside an epoch, before its last batch
    (asked in ``on_train_start``, when the loops hold the checkpoint's progress)."""
    loop = trainer.fit_loop
    batches = loop.epoch_loop.batch_progress
    return bool(
        loop.restarting
        and loop.epoch_progress.total.processed < loop.epoch_progress.total.started
        and batches.current.processed > 0
        and not batches.is_last_batch
    )
