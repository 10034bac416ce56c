"""Online batch selection: forward the batch without gradients, backpropagate only its most useful samples.

The data-selection method that needs no sample ids and no epochs - it works on any stream:

* Loshchilov & Hutter, "Online Batch Selection for Faster Training of Neural Networks" (2015) and
  Jiang et al., "Accelerating Deep Learning by Focusing on the Biggest Losers" (Selective
  Backprop, 2019): select by the training loss. Composer's ``SelectiveBackprop``
  (``mosaicml/composer``, ``composer/algorithms/selective_backprop/selective_backprop.py``,
  ``select_using_loss``) samples ``keep * B`` of the batch without replacement with probability
  rising with the loss rank: ``p_i ∝ ((rank_i + 0.5) / B) ** (1 / keep - 1)`` (ascending ranks).
* Mindermann et al., "Prioritized Training on Points that are Learnable, Worth Learning, and Not
  Yet Learnt" (RHO-LOSS, ICML 2022; ``OATML/RHO-Loss``, ``src/curricula/selection_methods.py``,
  ``reducible_loss_selection``): the top ``keep * B`` by the *reducible* loss, training loss minus
  a reference ("irreducible loss") model's loss on the sample.

:func:`select_indices` is the rule, usable in any loop; :func:`slice_batch` cuts a batch (tensors,
mappings, tuples, namedtuples) to the chosen rows. :class:`OnlineBatchSelection` is the Lightning
callback: the reducer (:mod:`weightwise.weighting.reducer`) asks it to choose the rows before
``training_step`` runs, so the step - forward *with* gradients, backward - sees only the kept rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from weightwise.compute.meter import spending
from weightwise.core import collectives
from weightwise.core.checkpoints import state_version, with_version
from weightwise.core.ids import SAMPLE_ID_KEY
from weightwise.weighting.callback import SampleWeightCallback
from weightwise.weighting.losses import TokenWeighting
from weightwise.weighting.reducer import NonFinitePolicy, parse_step_output

Method = Literal["sample", "top"]
ReferenceLoss = Callable[[Any], Tensor]
"""``reference_loss(batch) -> [B]`` per-sample losses of a reference model (RHO-LOSS)."""


def row_scores(output: Any) -> Tensor:
    """One selection score per row of the batch from a ``training_step`` output, ``[B]`` float32.

    Rows are what a step can keep or drop, so token losses (``{"loss": [B, T], "mask": ...}``) score
    each row by the mean over its valid tokens - with packed documents, the token-weighted mean of
    the row's documents - and a row without a valid token scores 0 (nothing to learn there).

    Raises:
        ValueError: a mask of another shape than the token losses; other outputs are read - and
            refused - by :func:`~weightwise.weighting.reducer.parse_step_output`.
    """
    losses, mask = (output.get("loss"), output.get("mask")) if isinstance(output, Mapping) else (None, None)
    if isinstance(losses, Tensor) and losses.ndim == 2 and isinstance(mask, Tensor):
        if mask.shape != losses.shape:
            raise ValueError(f"token losses {tuple(losses.shape)} need a 'mask' of the same shape, got {tuple(mask.shape)}")
        mask = mask.bool()
        counts = mask.sum(dim=1)
        sums = torch.where(mask, losses.detach().float(), 0.0).sum(dim=1)
        return sums / counts.clamp(min=1)
    return parse_step_output(output).losses.detach().float()


def select_indices(scores: Tensor, keep: float, method: Method = "sample", generator: torch.Generator | None = None) -> Tensor:
    """Rows to keep of a batch scored ``scores`` (higher: more useful), sorted ascending.

    * ``"sample"``: Composer's ``select_using_loss``: ``int(keep * B)`` rows without replacement,
      ``p ∝ ((rank + 0.5) / B) ** (1 / keep - 1)`` over ascending score ranks;
    * ``"top"``: RHO-LOSS's ``top_x_indices``: the ``int(keep * B)`` highest scores.

    At least one row is kept.

    Raises:
        ValueError: ``keep`` outside (0, 1], an unknown method, scores not 1-D.

    Example::

        >>> import torch
        >>> from weightwise.selection.online import select_indices
        >>> select_indices(torch.tensor([0.1, 3.0, 0.2, 2.0]), 0.5, "top").tolist()
        [1, 3]
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got {tuple(scores.shape)}")
    n = scores.numel()
    k = max(1, int(keep * n))
    if method == "top":
        return torch.sort(torch.topk(scores.detach().float(), k).indices).values
    if method != "sample":
        raise ValueError(f"method must be 'sample' or 'top', got {method!r}")
    ascending = torch.argsort(scores.detach().float().cpu(), stable=True)
    percentile = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    probs = percentile ** (1.0 / keep - 1.0)
    drawn = torch.multinomial(probs / probs.sum(), k, replacement=False, generator=generator)
    return torch.sort(ascending[drawn]).values.to(scores.device)


def slice_batch(batch: Any, rows: Tensor, batch_size: int) -> Any:
    """``batch`` with only ``rows`` of every tensor whose first dimension is the batch's.

    Mappings (``dict``, HF ``BatchEncoding``), tuples, namedtuples and lists are sliced element by
    element; other values (a string, a scalar tensor) pass unchanged.

    Raises:
        TypeError: a batch of another type; return per-row tensors or pass ``slice_batch=`` to the callback.
    """
    if isinstance(batch, Tensor):
        return batch[rows.to(batch.device)] if batch.ndim > 0 and batch.shape[0] == batch_size else batch
    if isinstance(batch, Mapping):
        return type(batch)({key: slice_batch(value, rows, batch_size) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(slice_batch(value, rows, batch_size) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(value, rows, batch_size) for value in batch)
    if isinstance(batch, (str, bytes, int, float, bool)) or batch is None:
        return batch
    raise TypeError(
        f"online batch selection cannot slice a batch of type {type(batch).__name__}: use tensors, mappings or tuples"
        " of tensors, or pass OnlineBatchSelection(slice_batch=lambda batch, rows: ...)"
    )


class OnlineBatchSelection(SampleWeightCallback):
    """Backpropagate only the most useful ``keep`` of every batch, chosen by a forward pass without grad.

    Before each training step in the active window, the module's own ``training_step`` runs on the
    whole batch under ``torch.no_grad()`` (train mode, as Composer and RHO-LOSS do); its per-sample
    losses - minus a reference model's (``reference_loss``, RHO-LOSS) - choose the rows
    (:func:`select_indices`), and the real step runs on those rows only: the backward pass, and
    the forward pass with its activations, shrink to ``keep`` of the batch, at the price of the
    extra forward without gradients. Per-rank: every rank selects from its own batch (as Composer
    and RHO-LOSS do), with a generator seeded by the seed, the step and the rank.

    Defaults are Composer's ``SelectiveBackprop``: ``keep=0.5``, active from ``start=0.5`` to
    ``end=0.9`` of training (fractions of ``Trainer.estimated_stepping_batches``; integers are
    steps), vanilla every ``interrupt=2``-nd step, the ``"sample"`` rule. RHO-LOSS:
    ``method="top", keep=0.1, start=0.0, end=1.0, interrupt=0`` and ``reference_loss=``
    (floats: a bare ``1`` would be step 1).
    Composer's ``scale_factor`` (down-sampling images for the selection pass) has no counterpart.

    What ``keep`` saves over a run: only steps inside the window that are not interrupted select.
    At Composer's defaults that is 20% of the steps (a window of 0.4 of the run, every other step
    whole), so ``keep=0.5`` backpropagates **10%** fewer rows than plain training, not half, and
    runs 10% *more* forward rows (on those steps, a no-grad forward of the whole batch plus the
    forward of the kept half). ``start=0.0, end=1.0, interrupt=0`` selects on every step: half the
    backward rows, 1.5x the forward rows. The ledger below counts both.

    Compute ledger (``ledger``, and logged ``weightwise/online_*``): ``steps_selected``,
    ``samples_forwarded`` (rows of the no-grad passes: the overhead), ``samples_backpropagated``
    and ``samples_skipped`` (rows whose forward-with-grad and backward were saved).

    Args:
        keep: fraction of each *selecting* batch backpropagated (see above for the run's share).
        method: ``"sample"`` (Composer) or ``"top"`` (RHO-LOSS).
        start, end: the active window: fractions of the run's optimizer steps, or step counts.
        interrupt: every ``interrupt``-th batch trains whole (``(batch_idx + 1) % interrupt == 0``,
            Composer's rule); 0 never.
        reference_loss: ``batch -> [B]`` losses of a reference model, subtracted (RHO-LOSS).
        slice_batch: ``(batch, rows) -> batch`` for batches :func:`slice_batch` cannot cut.
        seed: base seed of the ``"sample"`` draws.
        nonfinite, sample_id_key, token_weighting, store_fields: see :class:`SampleWeightCallback`.

    Raises:
        ValueError: a bad setting.

    Example::

        >>> import lightning.pytorch as pl
        >>> from weightwise.callbacks import OnlineBatchSelection
        >>> trainer = pl.Trainer(callbacks=[OnlineBatchSelection(keep=0.5)], logger=False)
    """

    STATE_VERSION = 1

    def __init__(
        self,
        keep: float = 0.5,
        *,
        method: Method = "sample",
        start: float = 0.5,
        end: float = 0.9,
        interrupt: int = 2,
        reference_loss: ReferenceLoss | None = None,
        slice_batch: Callable[[Any, Tensor], Any] | None = None,
        seed: int = 0,
        nonfinite: NonFinitePolicy = "raise",
        sample_id_key: str = SAMPLE_ID_KEY,
        token_weighting: TokenWeighting = "rank",
        store_fields: Sequence[str] = (),
    ) -> None:
        super().__init__(nonfinite=nonfinite, sample_id_key=sample_id_key, token_weighting=token_weighting, store_fields=store_fields)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        if method not in ("sample", "top"):
            raise ValueError(f"method must be 'sample' or 'top', got {method!r}")
        if start < 0 or end < start or interrupt < 0:
            raise ValueError(f"need 0 <= start <= end and interrupt >= 0, got start={start}, end={end}, interrupt={interrupt}")
        self.keep = keep
        self.method: Method = method
        self.start, self.end = start, end
        self.interrupt = interrupt
        self.reference_loss = reference_loss
        self.slicer = slice_batch
        self.seed = seed
        self.ledger: dict[str, int] = {"steps_selected": 0, "samples_forwarded": 0, "samples_backpropagated": 0, "samples_skipped": 0}

    @override
    def sample_weights(self, losses: Tensor, sample_ids: Tensor | None, trainer: pl.Trainer) -> None:
        return None  # it chooses rows; the kept rows are not reweighted

    def _window(self, trainer: pl.Trainer) -> tuple[float, float]:
        total = trainer.estimated_stepping_batches  # inf, or max_steps (-1 when unset) for a stream without a length
        fractional = lambda value: isinstance(value, float) and value <= 1.0  # noqa: E731
        if any(fractional(value) and value > 0.0 for value in (self.start, self.end)) and not (math.isfinite(total) and total > 0):
            raise MisconfigurationException(
                f"OnlineBatchSelection(start={self.start}, end={self.end}) gives its window as fractions of the run, but this"
                " run's length is unknown (an endless stream without max_steps): set Trainer(max_steps=...) or give the"
                " window in steps, e.g. start=1000, end=9000"
            )
        first, last = (value * total if fractional(value) else value for value in (self.start, self.end))
        return first, last

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._window(trainer)  # a window the run cannot place is refused now, not at the first step

    def active(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether this step selects (Composer's ``should_selective_backprop``)."""
        first, last = self._window(trainer)
        in_window = first <= trainer.global_step < last
        return in_window and (self.interrupt == 0 or (batch_idx + 1) % self.interrupt != 0)

    def select_batch(self, trainer: pl.Trainer, batch: Any, batch_idx: int, step: Callable[[Any], Any]) -> Any:
        """The rows of ``batch`` the training step should see (called by the reducer before the step).

        Args:
            trainer: the running trainer.
            batch: the step's batch.
            batch_idx: its index in the epoch.
            step: runs the module's own ``training_step`` on a batch.
        """
        if not self.active(trainer, batch_idx):
            return batch
        with torch.no_grad(), spending("selection_forward"):  # counted by ComputeBudget
            scores = row_scores(step(batch))
        if self.reference_loss is not None:
            with torch.no_grad(), spending("reference_model"):
                scores = scores - self.reference_loss(batch).detach().float().to(scores.device)
        n = scores.numel()
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + trainer.global_step) * 1_009 + collectives.rank())
        rows = select_indices(scores, self.keep, self.method, generator)
        self.ledger["steps_selected"] += 1
        self.ledger["samples_forwarded"] += n
        self.ledger["samples_backpropagated"] += rows.numel()
        self.ledger["samples_skipped"] += n - rows.numel()
        if self.slicer is not None:
            return self.slicer(batch, rows)
        return slice_batch(batch, rows, n)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {f"weightwise/online_{key}": float(value) for key, value in self.ledger.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return with_version({"ledger": dict(self.ledger)}, self.STATE_VERSION)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_version(state_dict, "OnlineBatchSelection", self.STATE_VERSION)
        self.ledger = dict(state_dict["ledger"])

