"""Lightning callbacks of sample weighting: the base of every weight contributor, and ``LossReweighting``."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import IterableDataset
from typing_extensions import override

from weightwise.core.checkpoints import state_version, with_version
from weightwise.core.ids import SAMPLE_ID_KEY
from weightwise.core.store import FIELDS
from weightwise.integrations.lightning import check_trainer, is_logging_step
from weightwise.weighting.losses import TokenWeighting
from weightwise.weighting.reducer import NonFinitePolicy, PerSampleLossReducer
from weightwise.weighting.reweighting import Strategy, check_strategy, loss_weights

CHECKPOINT_KEY = "weightwise"
"""Where the shared reducer's state (the score store) lives in a Lightning checkpoint."""


class SampleWeightCallback(Callback):
    """A Lightning callback that weights samples; all of them share one :class:`PerSampleLossReducer`.

    Subclasses implement :meth:`sample_weights`. The shared reducer multiplies every subclass'
    factor into one weight per sample, reduces the loss, and keeps the score store, which is
    saved in checkpoints under ``checkpoint["weightwise"]``.

    Args:
        nonfinite: ``"raise"`` (default) stops on a NaN/inf per-sample loss with the sample ids;
            ``"drop"`` leaves such samples out of the step and counts them
            (``weightwise/nonfinite_dropped``).
        sample_id_key: the batch key carrying dataset indices (see :class:`weightwise.IndexedDataset`).
        token_weighting: when ``training_step`` returns token losses (or token counts), sequences are
            weighted by their share of the tokens - ``"rank"``: of their rank's (Sow et al.'s trainer,
            and plain ``model(**batch).loss`` under DDP), ``"global"``: of the global batch's
            (:func:`weightwise.weighting.losses.token_shares`).
        store_fields: score-store fields to keep per sample besides those the callbacks read (e.g.
            ``("loss", "ema", "weight")`` to inspect ``reducer.scores`` after a fit; see
            :data:`weightwise.core.store.FIELDS`). Needs sample ids in the batches.

    Attributes:
        needs_sample_ids: whether the callback keeps per-sample history, so batches must carry ids.

    Raises:
        ValueError: an unknown ``nonfinite`` policy or ``token_weighting``.

    Example (a callback of your own: its factor multiplies into the one combined weight)::

        >>> import torch
        >>> class CapOutliers(SampleWeightCallback):  # weight 0 above 3x the batch's median loss
        ...     def sample_weights(self, losses, sample_ids, trainer):
        ...         return (losses <= 3 * losses.median()).float()
        >>> CapOutliers().sample_weights(torch.tensor([1.0, 1.2, 9.0]), None, trainer=None)
        tensor([1., 1., 0.])
    """

    needs_sample_ids = False

    def __init__(
        self,
        *,
        nonfinite: NonFinitePolicy = "raise",
        sample_id_key: str = SAMPLE_ID_KEY,
        token_weighting: TokenWeighting = "rank",
        store_fields: Sequence[str] = (),
    ) -> None:
        unknown = [name for name in store_fields if name not in FIELDS]
        if unknown:
            raise ValueError(f"unknown score-store fields {unknown}; the fields are {list(FIELDS)}")
        if nonfinite not in ("raise", "drop"):
            raise ValueError(f"nonfinite must be 'raise' or 'drop', got {nonfinite!r}")
        if token_weighting not in ("rank", "global"):
            raise ValueError(f"token_weighting must be 'rank' or 'global', got {token_weighting!r}")
        self.nonfinite: NonFinitePolicy = nonfinite
        self.sample_id_key = sample_id_key
        self.token_weighting: TokenWeighting = token_weighting
        self.store_fields = tuple(store_fields)
        self.needs_sample_ids = self.needs_sample_ids or bool(self.store_fields)
        self.reducer: PerSampleLossReducer | None = None

    def sample_weights(self, losses: Tensor, sample_ids: Tensor | None, trainer: pl.Trainer) -> Tensor | None:
        """This callback's factor for each sample of the global batch (``None``: all ones).

        Args:
            losses: ``[B_global]`` finite per-sample losses of every rank, detached.
            sample_ids: ``[B_global]`` their dataset indices (``None`` for a stream without ids;
                callbacks with ``needs_sample_ids`` always get them).
            trainer: the running trainer.
        """
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_trainer(trainer)
            contributors = [cb for cb in trainer.callbacks if isinstance(cb, SampleWeightCallback)]
            self.reducer = PerSampleLossReducer.install(trainer, pl_module, contributors)
            self.reducer.scores.require(*self.store_fields)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Size the score store to the training set when the loader knows it: learning N from the
        # ids it sees, the store grows by doubling and can end near 2N (on every rank).
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if self.reducer is not None and self.reducer.scores.fields and isinstance(dataset, Sized) and not isinstance(dataset, IterableDataset):
            self.reducer.scores.reserve(len(dataset))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.reducer is not None:
            self.reducer.uninstall()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hook when fit raises or is interrupted (docs/architecture.md, contract 6).
        if self.reducer is not None:
            self.reducer.uninstall()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reducer is not None:
            self.reducer.check_gradients_after_drop()

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.reducer is not None and CHECKPOINT_KEY not in checkpoint:
            checkpoint[CHECKPOINT_KEY] = self.reducer.state_dict()

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.reducer is not None and CHECKPOINT_KEY in checkpoint:
            self.reducer.load_state_dict(checkpoint[CHECKPOINT_KEY])


Warmup = Literal["uniform", "temperature"]
Statistic = Literal["batch", "window"]


class LossReweighting(SampleWeightCallback):
    """Weight each sample of every step by its loss relative to the rest of the global batch.

    Implements Sow et al., "Dynamic Loss-Based Sample Reweighting for Improved Large Language Model
    Pretraining" (ICLR 2025; authors' code ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025``,
    ``src/trainer.py``): ``w = B * softmax(f(l~) / r)`` with the losses ``l~`` normalised to
    [-delta, delta] over the global batch and ``f`` one of

    * ``"linupper"`` ``min(l~ + delta, delta)`` - down-weights the easiest samples;
    * ``"quadratic"`` (the reference's ``"mid"``) ``1 - l~^2 / delta^2`` - down-weights both extremes;
    * ``"extremes"`` ``|l~|`` - up-weights both extremes;
    * ``"upper"`` ``0.5 l~ + 0.5 delta`` - up-weights in proportion to the loss;
    * ``"uniform"`` - weight 1: exactly plain mean-loss training.

    See :mod:`weightwise.weighting.reweighting` for the derivation. Weights have mean 1 over the
    global batch, are non-negative and detached. The ``LightningModule``'s ``training_step`` returns
    the unreduced loss - ``[B]``, or token losses ``{"loss": [B, T], "mask": [B, T]}`` (sequences are
    then weighted by their token share as in the reference's trainer); nothing else changes, and no
    sample ids are needed: it works on any stream.

    Defaults are the reference's: delta 1; r = 0.4 (five of its six published configurations; the
    code's dataclass default is 1); no reweighting during the first ``warmup_steps = 1000``
    optimizer steps (its ``burnout_steps``) - a warning says so when the warm-up covers the whole run
    (Lightning's ``estimated_stepping_batches``, i.e. ``max_steps`` or the epochs times the loader's
    length), and ``weightwise/reweighting_active`` logs the phase at every logged step (0 during the
    warm-up, 1 after). Options that depart from it, each for a reason:

    * ``warmup="temperature"``: during the warm-up, weight at ``warmup_temperature`` (100, nearly
      uniform) instead of not at all - the authors' FSDP branch (``fms-fsdp``, ``reweighted-train``).
    * ``statistic="window"``: the range and the softmax's normaliser over the last ``window``
      samples of the run (every rank's, the current batch included) instead of the micro-batch -
      for micro-batches of a few sequences, where a batch's min/max is meaningless (one sequence
      always gets weight 1). The reference uses the micro-batch (its configurations never
      accumulate gradients); with ``accumulate_grad_batches=k`` the default is the same: each
      micro-batch's global batch (over the ranks) is normalised on its own, and Lightning divides
      each micro-batch's loss by k, so ``"uniform"`` is exactly plain training.

    Args:
        strategy: one of ``"linupper"``, ``"quadratic"`` (``"mid"``), ``"extremes"``, ``"upper"``, ``"uniform"``.
        delta: half-width of the normalised loss range (reference: 1).
        temperature: the paper's ``r``; larger is closer to uniform (reference configurations: 0.4).
        warmup_steps: optimizer steps at the start without reweighting (reference: 1000).
        warmup: ``"uniform"`` (reference) or ``"temperature"``.
        warmup_temperature: r during a ``"temperature"`` warm-up (fms-fsdp: 100, for 2000 steps - pass
            ``warmup_steps=2000`` to run that branch's schedule).
        statistic: ``"batch"`` (reference) or ``"window"``.
        window: samples in the window of ``statistic="window"``.
        nonfinite, sample_id_key, token_weighting, store_fields: see :class:`SampleWeightCallback`.

    Raises:
        ValueError: an unknown strategy, warm-up or statistic, or a non-positive number.

    Example::

        >>> import lightning.pytorch as pl
        >>> from weightwise.callbacks import LossReweighting
        >>> trainer = pl.Trainer(callbacks=[LossReweighting("linupper", warmup_steps=100)], logger=False)
    """

    STATE_VERSION = 1

    def __init__(
        self,
        strategy: Strategy = "linupper",
        *,
        delta: float = 1.0,
        temperature: float = 0.4,
        warmup_steps: int = 1000,
        warmup: Warmup = "uniform",
        warmup_temperature: float = 100.0,
        statistic: Statistic = "batch",
        window: int = 1024,
        nonfinite: NonFinitePolicy = "raise",
        sample_id_key: str = SAMPLE_ID_KEY,
        token_weighting: TokenWeighting = "rank",
        store_fields: Sequence[str] = (),
    ) -> None:
        super().__init__(nonfinite=nonfinite, sample_id_key=sample_id_key, token_weighting=token_weighting, store_fields=store_fields)
        check_strategy(strategy)
        if delta <= 0 or temperature <= 0 or warmup_temperature <= 0:
            raise ValueError(
                f"delta and the temperatures must be positive, got delta={delta}, temperature={temperature},"
                f" warmup_temperature={warmup_temperature}"
            )
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if warmup not in ("uniform", "temperature"):
            raise ValueError(f"warmup must be 'uniform' or 'temperature', got {warmup!r}")
        if statistic not in ("batch", "window"):
            raise ValueError(f"statistic must be 'batch' or 'window', got {statistic!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.strategy: Strategy = strategy
        self.delta = delta
        self.temperature = temperature
        self.warmup_steps = warmup_steps
        self.warmup: Warmup = warmup
        self.warmup_temperature = warmup_temperature
        self.statistic: Statistic = statistic
        self.window = window
        self._recent: Tensor | None = None  # the window's losses, oldest first (statistic="window")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Lightning's estimate of the run's optimizer steps: max_steps when set, else from the epochs
        # and the loader's length (inf for a stream without max_steps: then nothing is known to warn about).
        total = trainer.estimated_stepping_batches
        if self.warmup_steps > 0 and total != float("inf") and self.warmup_steps >= total:
            during = "without reweighting" if self.warmup == "uniform" else f"at the warm-up temperature {self.warmup_temperature}"
            rank_zero_warn(
                f"LossReweighting's warm-up (warmup_steps={self.warmup_steps}) covers the whole run ({int(total)} optimizer"
                f" steps): every step trains {during}, never with {self.strategy!r}. Pass a smaller warmup_steps (the"
                " reference's 1000 is for runs of many thousand steps), or warmup_steps=0."
            )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # The phase, as the weights of this step see it: 0 during the warm-up, 1 once the strategy weights.
        if is_logging_step(trainer):
            active = float(trainer.global_step >= self.warmup_steps)
            pl_module.log("weightwise/reweighting_active", active, on_step=True, on_epoch=False, batch_size=1)

    def _settings(self) -> dict[str, Any]:
        names = ("strategy", "delta", "temperature", "warmup_steps", "warmup", "warmup_temperature", "statistic", "window")
        return {name: getattr(self, name) for name in names}

    @override
    def sample_weights(self, losses: Tensor, sample_ids: Tensor | None, trainer: pl.Trainer) -> Tensor | None:
        window = None
        if self.statistic == "window":
            recent = losses if self._recent is None else torch.cat([self._recent.to(losses.device), losses])
            window = recent[-max(self.window, losses.numel()) :]  # the whole current batch, even beyond `window`
            self._recent = recent[-self.window :]
        temperature = self.temperature
        if trainer.global_step < self.warmup_steps:
            if self.warmup == "uniform":
                return None
            temperature = self.warmup_temperature
        return loss_weights(losses, self.strategy, delta=self.delta, temperature=temperature, window=window)

    @override
    def state_dict(self) -> dict[str, Any]:
        recent = None if self._recent is None else self._recent.cpu().clone()
        return with_version({**self._settings(), "recent": recent}, self.STATE_VERSION)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_version(state_dict, "LossReweighting", self.STATE_VERSION) == 0:
            # weightwise 0.1 had no warm-up and normalised per batch.
            moot = {"warmup": self.warmup, "warmup_temperature": self.warmup_temperature, "window": self.window}
            state_dict = {**state_dict, **moot, "warmup_steps": 0, "statistic": "batch", "recent": None}
        saved = {name: state_dict[name] for name in self._settings()}
        if saved != self._settings():
            changed = {k: (v, self._settings()[k]) for k, v in saved.items() if v != self._settings()[k]}
            raise ValueError(
                f"the checkpoint was trained with other LossReweighting settings (saved, now): {changed};"
                " resume with the saved settings"
            )
        self._recent = state_dict["recent"]
