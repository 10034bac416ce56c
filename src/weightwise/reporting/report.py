"""``SampleReport``: a table of the samples weightwise weighted lowest and found hardest."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from weightwise.core.store import SampleScoreStore

if TYPE_CHECKING:
    from weightwise.weighting.callback import SampleWeightCallback

COLUMNS = ["view", "sample_id", "last_weight", "loss_ema", "visits"]


def suspicious_samples(scores: SampleScoreStore, k: int) -> dict[str, Tensor]:
    """The ids of the ``k`` seen samples with the lowest last weight and of the ``k`` with the highest
    loss EMA - in practice, where mislabelled or odd data hides. Usable on any store, in any loop.

    Ties in weight - all of them where nothing reweights (RS2, Data Diet, CCS and online selection
    give every sample weight 1) - are broken by the higher loss EMA, so the "lowest weight" view
    then lists the hardest samples rather than the lowest ids.

    Args:
        scores: a store that keeps ``"weight"`` and ``"ema"``.
        k: samples per view (fewer when fewer were seen).

    Returns:
        ``{"lowest weight": ids, "highest loss": ids}``, each ``[<= k]`` on the CPU, most suspicious first.

    Example::

        >>> from weightwise import SampleScoreStore
        >>> store = SampleScoreStore(4, fields=("weight", "ema"))
        >>> store.update(torch.arange(4), torch.tensor([0.1, 3.0, 0.2, 0.4]), step=0, weights=torch.tensor([1.2, 0.1, 1.0, 0.9]))
        >>> suspicious_samples(store, 2)
        {'lowest weight': tensor([1, 3]), 'highest loss': tensor([1, 3])}
    """
    seen = scores.seen.nonzero().squeeze(1).cpu()
    weight, ema = scores.weight.cpu()[seen], scores.ema.cpu()[seen]
    k = min(k, seen.numel())
    by_ema = torch.argsort(ema.nan_to_num(float("-inf")), descending=True, stable=True)
    by_weight = by_ema[torch.argsort(weight[by_ema].nan_to_num(float("inf")), stable=True)]  # ties keep the EMA order
    return {"lowest weight": seen[by_weight[:k]], "highest loss": seen[by_ema[:k]]}


class SampleReport(Callback):
    """At the end of training, list the ``k`` samples with the lowest last weight and the ``k`` with
    the highest loss EMA - in practice, where mislabelled or odd data hides.

    The rows go to a W&B Table (``weightwise/samples``) when a ``WandbLogger`` is attached, and to
    ``weightwise_samples.csv`` in the trainer's log directory otherwise. ``describe(sample_id)``
    adds columns about the sample itself (its text, its label). Where nothing reweights (RS2, Data
    Diet, CCS, online selection: every weight 1) the "lowest weight" view ranks the tied weights by
    loss EMA (:func:`suspicious_samples`), so it lists the hardest samples, not the lowest ids.

    Needs a weightwise weighting callback (``LossReweighting``, ``DataPruning``) in the same Trainer:
    their score store is what is reported.

    Raises:
        ValueError: ``k`` < 1.
        MisconfigurationException: (at fit start) no weightwise weighting callback in the Trainer.

    Example::

        >>> import lightning.pytorch as pl
        >>> from weightwise.callbacks import LossReweighting, SampleReport
        >>> report = SampleReport(k=10, describe=lambda i: {"text": f"article {i}"})
        >>> trainer = pl.Trainer(callbacks=[LossReweighting("uniform"), report], logger=False)
    """

    needs_sample_ids = True  # it reports the score store, which is kept by sample id

    def __init__(self, k: int = 20, describe: Callable[[int], dict[str, Any]] | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.describe = describe
        self.rows: list[list[Any]] = []
        self.columns: list[str] = list(COLUMNS)

    FIELDS = ("weight", "ema", "count")
    """The score-store fields the report reads."""

    def _source(self, trainer: pl.Trainer) -> SampleWeightCallback:
        # imported here: the reducer imports weightwise.reporting (histograms), whose face exports this module
        from weightwise.weighting.callback import SampleWeightCallback
        source = next((cb for cb in trainer.callbacks if isinstance(cb, SampleWeightCallback) and cb.reducer), None)
        if source is None:
            raise MisconfigurationException(
                "SampleReport reports weightwise's score store: add LossReweighting or DataPruning to the Trainer"
            )
        return source

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._source(trainer).reducer.scores.require(*self.FIELDS)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scores = self._source(trainer).reducer.scores
        self.rows = []
        for view, ids in suspicious_samples(scores, self.k).items():
            for i in ids.tolist():
                extra = self.describe(i) if self.describe else {}
                row = [view, i, float(scores.weight[i]), float(scores.ema[i]), int(scores.count[i]), *extra.values()]
                self.rows.append(row)
        if self.describe and self.rows:
            self.columns = COLUMNS + list(self.describe(self.rows[0][1]).keys())
        # trainer.log_dir is a collective under DDP/DeepSpeed (rank 0 broadcasts it): every rank asks.
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self._write(trainer, directory)

    def _write(self, trainer: pl.Trainer, directory: Path) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for logger in wandb_loggers:
            logger.log_table(key="weightwise/samples", columns=self.columns, data=self.rows)
        if not wandb_loggers:
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / "weightwise_samples.csv", "w", newline="") as handle:
                csv.writer(handle).writerows([self.columns, *self.rows])
