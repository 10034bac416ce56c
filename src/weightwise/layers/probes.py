"""Suppression probes: the loss of a model whose chosen layers respond only partly (IST).

IST (Yao et al., EMNLP 2024 Findings; ``antgroup/importance-aware-sparse-tuning-IST-paper``,
``ist.py``) scales the adapters' output of the suppressed layers by 0.25 (``switch_active_adapter``
multiplies LoRA's ``scaling``) and measures the loss in eval mode without gradients.

* With peft LoRA adapters in a layer, their scaling is multiplied (peft's public
  ``LoraLayer.scale_layer`` / ``unscale_layer``), exactly as the reference.
* A layer without adapters (full fine-tuning) has its residual contribution scaled instead:
  ``output = input + factor * (layer(input) - input)`` - the same "respond at a quarter" for a
  whole layer, through a forward hook.

The probes' data (:class:`ProbeBatches`): the reference's ``ISTCallback`` builds its own
``DataLoader(dataset, batch_size=16, shuffle=True)`` over the training set and takes the next batch
for every probe round (a new shuffled pass when one is used up), so the probe loss' noise is that of
16 samples whatever the training micro-batch. :class:`ProbeBatches` draws the same: batches of
``batch_size=16`` from shuffled passes over the training loader's dataset - the permutation of pass
``p`` from a generator seeded by ``(seed, p)``, so every rank probes the same batch and a resumed run
the batches it would have probed (the reference's shuffle is unseeded). ``batch_size=None`` probes
the step's own micro-batch instead (weightwise 0.2's behaviour, and the only choice for an
``IterableDataset``, which cannot be indexed).

The probe's loss (:func:`default_probe_loss`): the reference evaluates its transformers model on the
batch (``model(**batch).loss``); that is what the default does when the module holds a transformers
model and the batch has ``input_ids`` (:func:`model_loss`), and otherwise it evaluates the module's
own ``training_step`` loss with logging silenced (:func:`module_loss`), so IST runs on any module
whose ``training_step`` returns a loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from weightwise.compute.meter import spending
from weightwise.integrations.lightning import MethodPatch

ProbeLoss = Callable[[pl.LightningModule, Any], Tensor]
"""``probe_loss(pl_module, batch) -> scalar loss`` of the module on a batch (called without grad, in eval mode)."""


def _adapters(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if callable(getattr(m, "scale_layer", None)) and callable(getattr(m, "unscale_layer", None))]


@contextlib.contextmanager
def suppressed(layers: Sequence[nn.Module], factor: float) -> Iterator[None]:
    """Inside the block, each of ``layers`` responds at ``factor`` of its strength (see the module doc)."""
    hooks, scaled = [], []

    def scale_residual(module: nn.Module, args: tuple, output: Any) -> Any:
        hidden_in = args[0]
        hidden_out = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden_in, Tensor) or hidden_in.shape != hidden_out.shape:
            raise ValueError(f"cannot suppress {type(module).__name__}: its first output is not shaped like its first input")
        damped = hidden_in + factor * (hidden_out - hidden_in)
        return (damped, *output[1:]) if isinstance(output, tuple) else damped

    try:
        for layer in layers:
            adapters = _adapters(layer)
            if adapters:
                for adapter in adapters:
                    adapter.scale_layer(factor)
                    scaled.append(adapter)
            else:
                hooks.append(layer.register_forward_hook(scale_residual))
        yield
    finally:
        for adapter in scaled:
            adapter.unscale_layer(factor)
        for hook in hooks:
            hook.remove()


def _transformers_model(pl_module: pl.LightningModule) -> nn.Module | None:
    from transformers import PreTrainedModel  # lazily: importing weightwise costs no transformers

    return next((m for m in pl_module.modules() if isinstance(m, PreTrainedModel)), None)


def model_loss(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """The loss of the transformers model inside ``pl_module`` on a batch mapping (``input_ids``,
    ``attention_mask``, ``labels``; labels default to the inputs for a causal LM) - the reference's
    ``model(**batch).loss``.

    Raises:
        ValueError: no transformers model in the module, or a batch it cannot read - use
            :func:`module_loss` or pass ``probe_loss=`` to the callback then.
    """
    model = _transformers_model(pl_module)
    if model is None or not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            "model_loss needs a transformers model in the module fed by a batch with 'input_ids'; use"
            " module_loss (the module's own training_step loss), or pass probe_loss=lambda module, batch: <scalar loss>"
            " to LayerwiseSampling"
        )
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    inputs.setdefault("labels", inputs["input_ids"])
    return model(**inputs).loss


def module_loss(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """The module's own training loss on ``batch``: its class's ``training_step`` (not a wrapper a
    fit installed), with ``self.log`` / ``self.log_dict`` silenced, reduced to a scalar - a scalar
    as it is, per-sample ``[B]`` losses by their mean, ``[B, T]`` token losses by their mean over
    the output's ``"mask"`` (as a language model's loss averages its valid tokens). Other side effects
    of ``training_step`` (metric updates, counters) happen as in a training step.

    Raises:
        ValueError: a ``training_step`` that returns no loss tensor, or token losses without a mask
            (pass ``probe_loss=`` then).
    """
    patches = [MethodPatch(pl_module, name, lambda original: lambda *args, **kwargs: None) for name in ("log", "log_dict")]
    try:
        output = type(pl_module).training_step(pl_module, batch, 0)
    finally:
        for patch in patches:
            patch.restore()
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor) or loss.ndim > 2:
        raise ValueError(
            "the suppression probes evaluate the module's training_step loss, which returned no scalar, [B] or [B, T]"
            " loss tensor: pass probe_loss=lambda module, batch: <scalar loss> to LayerwiseSampling"
        )
    if loss.ndim < 2:
        return loss.mean()
    mask = output.get("mask") if isinstance(output, Mapping) else None
    if not isinstance(mask, Tensor):
        raise ValueError("training_step returned [B, T] token losses without a 'mask': return one, or pass probe_loss=")
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def default_probe_loss(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """The probes' default loss: :func:`model_loss` (the reference's) when the module holds a
    transformers model and the batch has ``input_ids``, else :func:`module_loss`."""
    if isinstance(batch, Mapping) and "input_ids" in batch and _transformers_model(pl_module) is not None:
        return model_loss(pl_module, batch)
    return module_loss(pl_module, batch)


PROBE_BATCH_SIZE = 16
"""The reference's probe batch size (``ISTCallback.batch_size``)."""


class ProbeBatches:
    """IST's probe data: batches drawn from shuffled passes over the training set (see the module doc).

    Draw ``d`` is batch ``d mod m`` of pass ``d // m`` (``m = ceil(N / batch_size)``; the last batch
    of a pass may be smaller, as the reference's loader's), its samples
    ``permutation_p[j * batch_size : (j + 1) * batch_size]`` with the permutation drawn by a
    generator seeded ``seed * 1_000_003 + p``: a function of the draw alone, the same on every rank
    and after a resume.

    Args:
        batch_size: samples per probe batch (the reference's 16); ``None``: the step's micro-batch.
        seed: the permutations' seed.

    Raises:
        ValueError: ``batch_size`` below 1.

    Example::

        >>> batches = ProbeBatches(batch_size=4, seed=0)
        >>> first, last = batches.indices(10, 0), batches.indices(10, 2)  # a pass of 10 samples: 4 + 4 + 2
        >>> len(first), len(last), sorted(first + batches.indices(10, 1) + last) == list(range(10))
        (4, 2, True)
    """

    def __init__(self, batch_size: int | None = PROBE_BATCH_SIZE, *, seed: int = 0) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"probe_batch_size must be >= 1 (or None: the step's micro-batch), got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed

    def indices(self, num_samples: int, draw: int) -> list[int]:
        """The dataset indices of probe batch ``draw`` over ``num_samples`` samples."""
        assert self.batch_size is not None
        per_pass = -(-num_samples // self.batch_size)
        epoch, position = divmod(draw, per_pass)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(num_samples, generator=generator)
        return order[position * self.batch_size : (position + 1) * self.batch_size].tolist()

    def __call__(self, trainer: pl.Trainer, step_batch: Any, draw: int) -> Any:
        """Probe batch ``draw``, collated by the training loader and moved to the module's device
        (``step_batch`` itself with ``batch_size=None``).

        Raises:
            MisconfigurationException: the training data cannot be indexed (names ``probe_batch_size=None``).
        """
        if self.batch_size is None:
            return step_batch
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if not isinstance(loader, DataLoader) or isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
            raise MisconfigurationException(
                "IST's probes draw their own batches of 16 from the training set, as the reference does, but the training"
                " data is not one map-style DataLoader dataset (a stream cannot be indexed): pass"
                " LayerwiseSampling(probe_batch_size=None) to probe each step's micro-batch"
            )
        batch = loader.collate_fn([dataset[i] for i in self.indices(len(dataset), draw)])  # type: ignore[index]
        return trainer.strategy.batch_to_device(batch)


def probe(pl_module: pl.LightningModule, batch: Any, layers: Sequence[nn.Module], factor: float, loss: ProbeLoss) -> Tensor:
    """The loss on ``batch`` with ``layers`` suppressed, in eval mode and without gradients."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad(), suppressed(layers, factor), spending("probes"):  # counted by ComputeBudget
            return loss(pl_module, batch).detach().float()
    finally:
        pl_module.train(was_training)
