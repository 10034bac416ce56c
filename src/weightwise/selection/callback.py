"""``DataPruning``: connects a weightwise sampler to the run and keeps the compute-savings ledger."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from weightwise.core.checkpoints import state_version, with_version
from weightwise.core.ids import SAMPLE_ID_KEY, IndexedDataset, sample_ids_from_batch
from weightwise.integrations.lightning import (
    distributed_wrapped_sampler,
    parameters_for_direct_forward,
    sampler_planned,
    set_epoch_length,
)
from weightwise.selection.base import EpochPlan, EpochSampler
from weightwise.selection.infobatch import InfoBatchSampler
from weightwise.selection.scoring import ScoreFn, gather_scores, reads_differ, score_dataset, training_step_scores
from weightwise.weighting.callback import SampleWeightCallback
from weightwise.weighting.losses import TokenWeighting
from weightwise.weighting.reducer import NonFinitePolicy


class DataPruning(SampleWeightCallback):
    """Dynamic data pruning / importance sampling with a sampler from :mod:`weightwise.samplers`.

    Put the sampler in the training ``DataLoader`` and this callback in the ``Trainer``::

        sampler = InfoBatchSampler(len(train_set), prune_ratio=0.5)
        loader = DataLoader(IndexedDataset(train_set), batch_size=32, sampler=sampler)
        trainer = pl.Trainer(callbacks=[DataPruning()], use_distributed_sampler=False)

    The callback

    * attaches the run's score store to the sampler (the losses every step records are its scores)
      and gives ``InfoBatchSampler`` the number of epochs from ``Trainer(max_epochs)``;
    * multiplies the sampler's per-sample correction (``1/(1-r)``, ``1/(N p_i)``) into the one
      combined loss weight (docs/architecture.md, contract 3), so it composes with ``LossReweighting``;
    * tells Lightning each epoch's true length, so the progress bar, ``val_check_interval`` and the
      epoch end follow the pruned epoch;
    * runs the scoring passes samplers ask for (Data Diet and NLU on Data Diets score the whole
      training set with the model in eval mode, no gradients; ``score_fn(module, batch)`` gives the
      scores, by default the module's own ``training_step``'s ``"scores"`` and its per-sample loss,
      recorded as ``"eval_loss"``)
      - each rank its share, gathered, so every rank plans the same. The references score the
      training set *without* augmentation (Data Diet's ``compute_scores`` on the stored training
      arrays; CCS's ``generate_importance_score.py`` with ``transform_identical``): when the
      training dataset augments, pass ``scoring_dataset=`` (the same samples in the same order,
      without random transforms); the pass reads the training loader's dataset otherwise, and warns
      when two reads of its first item differ (a random augmentation);
    * logs a ledger every epoch: ``weightwise/epoch_samples`` (visited, all ranks),
      ``weightwise/epoch_fraction_skipped``, ``weightwise/samples_skipped_total`` (forward and
      backward passes saved against full-data epochs), ``weightwise/fraction_skipped_total`` and
      ``weightwise/epoch_seconds``, and the running totals of ``DataPruning.ledger`` as
      ``weightwise/ledger/<key>`` (``epochs``, ``samples_visited``, ``samples_full``, ``seconds``,
      and the forward-only ``samples_scored`` and their ``scoring_seconds``) - in W&B the last
      value of each is the run summary's;
    * checkpoints the sampler's state and the ledger (docs/architecture.md, contract 4); a checkpoint written mid-epoch
      (``ModelCheckpoint(every_n_train_steps=...)``) also holds the epoch's plan and how many of
      this rank's samples already trained, so a resumed run trains exactly the rest of the epoch
      (Lightning restarts a plain ``DataLoader`` from its first batch otherwise).

    Learning-rate schedules: size them in steps. ``trainer.estimated_stepping_batches`` is computed
    from the first (full) epoch, so with pruning it is an upper bound on the steps the run takes.

    Args:
        score_fn: ``(module, batch) -> {name: [B] scores}`` for scoring passes (default: the
            module's ``training_step``, see above).
        scoring_dataset: the dataset scoring passes read, indexed like the training set (item i is
            training sample i) but without random augmentation, as the references score; wrapped in
            ``IndexedDataset`` (with the training set's key) when the training set is one and it
            is not. ``None``: the training loader's dataset.
        score_store_path: a directory for a memory-mapped score store, for corpora of 1e8-1e9
            samples (:meth:`weightwise.SampleScoreStore.memory_map`): each rank keeps its copy in
            ``<score_store_path>/rank<global rank>`` - on node-local disk - written in lock-step
            with the others', so every rank still plans the same. ``None``: in process memory.
        nonfinite, sample_id_key, token_weighting, store_fields: see :class:`SampleWeightCallback`.

    Raises:
        MisconfigurationException: at fit start, a loader without a weightwise sampler, or one that
            Lightning wrapped in a second ``DistributedSampler`` (the message names the fix); a
            ``scoring_dataset`` of another length than the sampler's.

    Example::

        >>> import lightning.pytorch as pl
        >>> from weightwise.callbacks import DataPruning
        >>> trainer = pl.Trainer(callbacks=[DataPruning()], use_distributed_sampler=False, logger=False)
    """

    STATE_VERSION = 1
    needs_sample_ids = True  # plans come from per-sample history

    def __init__(
        self,
        *,
        score_fn: ScoreFn | None = None,
        scoring_dataset: Dataset | None = None,
        nonfinite: NonFinitePolicy = "raise",
        sample_id_key: str = SAMPLE_ID_KEY,
        token_weighting: TokenWeighting = "rank",
        store_fields: Sequence[str] = (),
        score_store_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(nonfinite=nonfinite, sample_id_key=sample_id_key, token_weighting=token_weighting, store_fields=store_fields)
        self.score_fn: ScoreFn = score_fn or training_step_scores
        self.scoring_dataset = scoring_dataset
        self._augmentation_checked = False
        self.score_store_path = None if score_store_path is None else Path(score_store_path)
        self.sampler: EpochSampler | None = None
        self.ledger: dict[str, float] = {
            "epochs": 0,
            "samples_visited": 0,
            "samples_full": 0,
            "seconds": 0.0,
            "samples_scored": 0,
            "scoring_seconds": 0.0,
        }
        self._scored_epoch: int | None = None
        self._pending_sampler_state: dict[str, Any] | None = None
        self._pending_mid_epoch: dict[str, Any] | None = None
        self._epoch_start = 0.0
        self._consumed = 0  # this rank's samples trained in the current epoch
        self._device_weights: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ wiring
    @staticmethod
    def find_sampler(trainer: pl.Trainer) -> EpochSampler:
        """The weightwise sampler of the (single) training DataLoader; errors name the fix."""
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise MisconfigurationException(
                f"DataPruning supports one training DataLoader, got {type(loader).__name__}"
            )
        candidates = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
        for sampler in candidates:
            if isinstance(sampler, EpochSampler):
                return sampler
            wrapped = distributed_wrapped_sampler(sampler)
            if isinstance(wrapped, EpochSampler):
                raise MisconfigurationException(
                    "Lightning wrapped the weightwise sampler in a DistributedSampler, which would shard it twice."
                    " weightwise samplers shard themselves: pass Trainer(use_distributed_sampler=False)."
                )
        raise MisconfigurationException(
            "DataPruning needs the training DataLoader to use a weightwise sampler, e.g."
            " DataLoader(IndexedDataset(ds), batch_size=32, sampler=weightwise.samplers.InfoBatchSampler(len(ds)))"
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = self.sampler = self.find_sampler(trainer)
        assert self.reducer is not None
        if self.score_store_path is not None:  # before anything sizes the store in process memory
            self.reducer.scores.memory_map(self.score_store_path / f"rank{trainer.global_rank}", sampler.num_samples)
        super().on_train_start(trainer, pl_module)
        if self._pending_sampler_state is not None:
            sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        if isinstance(sampler, InfoBatchSampler) and sampler.num_epochs is None:
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                raise MisconfigurationException("InfoBatchSampler needs num_epochs= when Trainer(max_epochs) is unset")
            sampler.num_epochs = trainer.max_epochs
        if self.scoring_dataset is not None and len(self.scoring_dataset) != sampler.num_samples:  # type: ignore[arg-type]
            raise MisconfigurationException(
                f"scoring_dataset has {len(self.scoring_dataset)} samples, the sampler {sampler.num_samples}: it must"  # type: ignore[arg-type]
                " hold the training set's samples, in the same order, without random augmentation"
            )
        self.reducer.scores.require(*sampler.store_fields)
        sampler.attach_scores(self.reducer.scores)
        sampler.set_epoch(trainer.current_epoch)
        if self._pending_mid_epoch is not None:  # Lightning calls no on_train_epoch_start when it restarts mid-epoch
            state, self._pending_mid_epoch = self._pending_mid_epoch, None
            if state["epoch"] == trainer.current_epoch:
                sampler.resume_epoch(trainer.current_epoch, EpochPlan(state["indices"], state["weights"]), state["consumed"])
                self._consumed = state["consumed"]
                self._set_epoch_length(trainer)
                self._epoch_start = time.perf_counter() - state["seconds"]
                sampler_planned(trainer, restored_mid_epoch=True)  # workers drew from the unrestored plan
            else:
                # Saved after the epoch's last batch: Lightning counts that epoch as done and goes on
                # without its epoch-end hooks, so its ledger entry is made here, and the next one starts.
                self._record_epoch(int(state["indices"].numel()), state["seconds"])
                self._start_epoch(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_epoch(trainer)

    def _start_epoch(self, trainer: pl.Trainer) -> None:
        assert self.sampler is not None
        epoch = trainer.current_epoch
        if self.sampler.needs_scoring(epoch) and self._scored_epoch != epoch:
            self._score(trainer, epoch)
        self.sampler.refresh()  # plan this epoch from the scores as they are now
        self._set_epoch_length(trainer)
        sampler_planned(trainer)  # in a fit's first epoch, workers drew indices before this plan
        self._epoch_start = time.perf_counter()
        self._consumed = 0

    def _score(self, trainer: pl.Trainer, epoch: int) -> None:
        """The sampler's scoring pass: each rank scores its share of the training set (forward only,
        eval mode), every rank gets all the scores (docs/architecture.md, contract 5)."""
        assert self.sampler is not None
        start = time.perf_counter()
        loader = trainer.train_dataloader
        n, ranks, rank = self.sampler.num_samples, self.sampler.num_replicas, self.sampler.rank
        share = list(range(n))
        share += share[: (-n) % ranks]  # equal shares: ZeRO-3 gathers parameters in every forward
        shard = DataLoader(
            self._scoring_dataset(loader.dataset), batch_size=loader.batch_size or 1, sampler=share[rank::ranks], collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )
        with parameters_for_direct_forward(trainer):
            ids, scores = score_dataset(
                trainer.lightning_module,
                shard,
                lambda batch: sample_ids_from_batch(batch, self.sample_id_key),
                self.score_fn,
                lambda batch: trainer.strategy.batch_to_device(batch),
            )
        ids, scores = gather_scores(ids, scores)
        self.sampler.record_scores(ids, scores)
        self._scored_epoch = epoch
        self.ledger["samples_scored"] += n
        self.ledger["scoring_seconds"] += time.perf_counter() - start

    def _scoring_dataset(self, training: Dataset) -> Dataset:
        """``scoring_dataset`` (with the training set's ids), or the training set - with a warning,
        once per fit, when two reads of its first item differ."""
        if self.scoring_dataset is None:
            if not self._augmentation_checked and len(training) > 0 and reads_differ(training):  # type: ignore[arg-type]
                rank_zero_warn(
                    "DataPruning's scoring pass reads the training dataset, and two reads of its first item differ:"
                    " the scores come from randomly augmented views, where Data Diet and CCS score un-augmented data."
                    " Pass DataPruning(scoring_dataset=<the same samples without random transforms>)"
                )
            self._augmentation_checked = True
            return training
        if isinstance(training, IndexedDataset) and not isinstance(self.scoring_dataset, IndexedDataset):
            return IndexedDataset(self.scoring_dataset, key=training.key)
        return self.scoring_dataset

    @staticmethod
    def _set_epoch_length(trainer: pl.Trainer) -> None:
        set_epoch_length(trainer, len(trainer.train_dataloader))

    # ------------------------------------------------------------------ weights and ledger
    def sample_weights(self, losses: Tensor, sample_ids: Tensor, trainer: pl.Trainer) -> Tensor | None:
        weights = self.sampler.epoch_weights() if self.sampler is not None else None
        if weights is None:
            return None
        if self._device_weights is None or self._device_weights[0] is not weights:
            # The [N] factors change once per epoch: copy them to the device once, not every step.
            self._device_weights = (weights, weights.to(losses.device))
        return self._device_weights[1].index_select(0, sample_ids)  # a gather; 2 µs less than [ids] at batch 256

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._consumed += int(sample_ids_from_batch(batch, self.sample_id_key).numel())

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.sampler is not None
        visited = int(self.sampler.plan.indices.numel())
        seconds = time.perf_counter() - self._epoch_start
        self._record_epoch(visited, seconds)
        self._consumed = 0  # a checkpoint from here on (epoch end) starts the next epoch afresh
        full = self.sampler.num_samples
        skipped_total = self.ledger["samples_full"] - self.ledger["samples_visited"]
        metrics = {
            "weightwise/epoch_samples": float(visited),
            "weightwise/epoch_fraction_skipped": 1.0 - visited / full,
            "weightwise/samples_skipped_total": float(skipped_total),
            "weightwise/fraction_skipped_total": skipped_total / self.ledger["samples_full"],
            "weightwise/epoch_seconds": seconds,
            **{f"weightwise/ledger/{key}": float(value) for key, value in self.ledger.items()},
        }
        pl_module.log_dict({k: torch.tensor(v) for k, v in metrics.items()}, on_step=False, on_epoch=True)

    def _record_epoch(self, visited: int, seconds: float) -> None:
        assert self.sampler is not None
        self.ledger["epochs"] += 1
        self.ledger["samples_visited"] += visited
        self.ledger["samples_full"] += self.sampler.num_samples
        self.ledger["seconds"] += seconds

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        sampler_state = self.sampler.state_dict() if self.sampler is not None else self._pending_sampler_state
        mid_epoch = None
        if self.sampler is not None and 0 < self._consumed:
            plan = self.sampler.plan
            mid_epoch = {
                "epoch": self.sampler.epoch,
                "consumed": self._consumed,
                "indices": plan.indices,
                "weights": plan.weights,
                "seconds": time.perf_counter() - self._epoch_start,
            }
        state = {"ledger": dict(self.ledger), "sampler": sampler_state, "mid_epoch": mid_epoch, "scored_epoch": self._scored_epoch}
        return with_version(state, self.STATE_VERSION)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_version(state_dict, "DataPruning", self.STATE_VERSION)
        self.ledger = {**self.ledger, **state_dict["ledger"]}
        self._scored_epoch = state_dict.get("scored_epoch")
        self._pending_sampler_state = state_dict["sampler"]
        self._pending_mid_epoch = state_dict.get("mid_epoch")
