"""Scoring passes: per-sample scores from a forward-only pass over the training set.

Data Diet (Paul et al., NeurIPS 2021; ``mansheej/data_diet``, ``data_diet/scores.py``) and NLU on
Data Diets (Attendu & Corbeil, 2023; ``jpcorbeil-nuance/nlu_data_diets``,
``hf_nlu_data_diet/trainer/callbacks.py``) score every training sample with a pass that trains
nothing - the model in eval mode (Data Diet's ``train=False``), no gradients - so rescoring costs a
forward pass, not a training epoch. :func:`score_dataset` is that pass for any loop;
:class:`ScoreAverager` combines passes as NLU on Data Diets does (``prune_utils.py``: the latest,
an exponential moving average, or the mean of the last k). The ``DataPruning`` callback runs the
pass when a sampler asks for it (:meth:`weightwise.selection.base.EpochSampler.needs_scoring`):
every rank scores its share of the dataset and the scores of all ranks are gathered, so every
rank's store - and every rank's next plan - is the same (docs/architecture.md, contract 5).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from weightwise.compute.meter import spending
from weightwise.core import collectives
from weightwise.core.checkpoints import state_version, with_version
from weightwise.core.store import SampleScoreStore
from weightwise.weighting.losses import check_per_sample_loss

ScoreFn = Callable[[pl.LightningModule, Any], Mapping[str, Tensor]]
"""``score_fn(module, batch) -> {name: [B] scores}``, called in eval mode without gradients."""

Averaging = Literal["latest", "ema", "last_k"]


def training_step_scores(pl_module: pl.LightningModule, batch: Any) -> dict[str, Tensor]:
    """The default score function: the module's own ``training_step`` (its class method, not the
    reducer's wrapper) - its ``"scores"``, and its per-sample loss as ``"eval_loss"`` (the store's
    ``"loss"`` is the latest *training* loss).

    Raises:
        ValueError: a ``training_step`` that returns no per-sample loss.
    """
    output = type(pl_module).training_step(pl_module, batch, 0)
    if isinstance(output, Mapping):
        scores = {name: values for name, values in output.get("scores", {}).items()}
        losses = output.get("loss")
    else:
        scores, losses = {}, output
    if isinstance(losses, Tensor) and losses.ndim == 1:
        scores["eval_loss"] = check_per_sample_loss(losses)
    return scores


@torch.no_grad()
def score_dataset(
    pl_module: pl.LightningModule,
    loader: DataLoader,
    ids_of: Callable[[Any], Tensor],
    score_fn: ScoreFn = training_step_scores,
    to_device: Callable[[Any], Any] = lambda batch: batch,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward-only pass in eval mode: ``(sample ids, {name: scores})`` of this process' batches.

    Args:
        pl_module: the model, put in eval mode for the pass and back afterwards.
        loader: batches to score (e.g. this rank's share of the training set).
        ids_of: the batch's sample ids (e.g. :func:`weightwise.sample_ids_from_batch`).
        score_fn: ``(module, batch) -> {name: [B] scores}``.
        to_device: moves a batch to the module's device.
    """
    was_training = pl_module.training
    pl_module.eval()
    ids: list[Tensor] = []
    scores: dict[str, list[Tensor]] = {}
    try:
        with spending("scoring"):  # counted by ComputeBudget
            for batch in loader:
                batch = to_device(batch)
                for name, values in score_fn(pl_module, batch).items():
                    scores.setdefault(name, []).append(values.detach().float())
                ids.append(ids_of(batch))
    finally:
        pl_module.train(was_training)
    device = next(iter(scores.values()))[0].device if scores else torch.device("cpu")
    return torch.cat(ids).to(device) if ids else torch.zeros(0, dtype=torch.long), {n: torch.cat(v) for n, v in scores.items()}


def same_item(first: Any, second: Any) -> bool:
    """Whether two reads of one dataset item are equal (tensors, arrays and containers compared by value)."""
    if isinstance(first, Tensor) or isinstance(second, Tensor):
        if not (isinstance(first, Tensor) and isinstance(second, Tensor) and first.shape == second.shape):
            return False
        if first.is_floating_point() and second.is_floating_point():  # nan equals nan: a read, not a random draw
            return bool(torch.equal(first.isnan(), second.isnan()) and torch.equal(first.nan_to_num(0.0), second.nan_to_num(0.0)))
        return torch.equal(first, second)
    if isinstance(first, Mapping):
        return isinstance(second, Mapping) and first.keys() == second.keys() and all(same_item(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)):
        return isinstance(second, (list, tuple)) and len(first) == len(second) and all(map(same_item, first, second))
    if isinstance(first, np.ndarray) or isinstance(second, np.ndarray):
        return bool(np.array_equal(first, second, equal_nan=np.asarray(first).dtype.kind == "f"))
    return bool(first == second)


def reads_differ(dataset: Dataset, index: int = 0) -> bool:
    """Whether reading ``dataset[index]`` twice gives two different items - a random augmentation.

    The reads run on forks of the global random generators (torch, numpy, Python), so the check
    draws nothing from the run's random streams.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return not same_item(dataset[index], dataset[index])
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def gather_scores(ids: Tensor, scores: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Every rank's ids and scores, in rank order, on every rank (a collective)."""
    names = sorted(scores)
    gathered, _ = collectives.all_gather_variable(ids.long(), *(scores[name].float() for name in names))
    return gathered[0], dict(zip(names, gathered[1:]))


class ScoreAverager:
    """Combines the scores of successive passes into the store's signals (NLU on Data Diets).

    * ``"latest"``: the last pass only (Data Diet within one run; NLU's default without averaging);
    * ``"ema"``: NLU's ``fetch_ema`` (``prune_utils.py``): the exponentially weighted mean of the
      passes *plus* ``std_coef`` times their exponentially weighted standard deviation,
      ``s = m + c * sd`` - a sample whose score moves between passes ranks higher. ``m`` is pandas'
      ``ewm(alpha, adjust=False).mean()`` (``m <- alpha x + (1 - alpha) m``, the first pass sets it)
      and ``sd`` its ``.std()``: with the passes' weights ``w_0 = (1 - alpha)^t``,
      ``w_i = alpha (1 - alpha)^(t - i)`` (summing to 1), ``sd^2 = sum_i w_i (x_i - m)^2 / (1 - sum_i w_i^2)``
      (pandas' bias correction). NLU's command line defaults to ``alpha = 0.8`` and ``c = 1.0``
      (``--prune_ema_var_coef``; its ``PruneConfig`` dataclass says 0.0), so ``std_coef=1.0`` here;
      ``std_coef=0.0`` is the mean alone (weightwise 0.2's ``"ema"``). As in the reference, one pass
      adds no deviation (``sd`` is undefined); NLU's ``--prune_ema_use_var`` (the variance instead of
      the standard deviation) is not offered;
    * ``"last_k"``: the mean of the last ``k`` passes (NLU's ``avg``).

    The averages are kept here (``[N]`` per statistic, ``[k, N]`` for ``"last_k"``), apart from the
    store, whose signal of the same name a training step may overwrite between passes; each pass
    writes the average into the store, where the samplers read it.

    Args:
        mode: see above.
        alpha: the EMA's weight of the newest pass.
        k: passes averaged by ``"last_k"``.
        std_coef: ``c``, the weight of the deviation in ``"ema"``.

    Raises:
        ValueError: an unknown mode, ``alpha`` outside (0, 1], ``k`` below 1 or a negative ``std_coef``.

    Example (two passes of one sample, 1 then 3; ``m = 2.6``, ``sd^2 = (0.2 * 1.6^2 + 0.8 * 0.4^2) / (1 - 0.68)``)::

        >>> from weightwise import SampleScoreStore
        >>> store, averager = SampleScoreStore(), ScoreAverager("ema", alpha=0.8, std_coef=1.0)
        >>> for score in (1.0, 3.0):
        ...     averager.record(store, torch.tensor([0]), {"el2n": torch.tensor([score])})
        >>> round(float(store.signal("el2n")[0]), 4)  # 2.6 + sqrt(0.64 / 0.32)
        4.0142
    """

    STATE_VERSION = 2  # 2: "ema" keeps the deviation's statistics (mean, variance, sum of squared weights)

    def __init__(self, mode: Averaging = "latest", *, alpha: float = 0.8, k: int = 3, std_coef: float = 1.0) -> None:
        if mode not in ("latest", "ema", "last_k"):
            raise ValueError(f"averaging must be 'latest', 'ema' or 'last_k', got {mode!r}")
        if not 0.0 < alpha <= 1.0 or k < 1:
            raise ValueError(f"alpha must be in (0, 1] and k >= 1, got alpha={alpha}, k={k}")
        if not std_coef >= 0.0:
            raise ValueError(f"std_coef (the EMA's deviation weight) must be >= 0, got {std_coef}")
        self.mode: Averaging = mode
        self.alpha = alpha
        self.k = k
        self.std_coef = std_coef
        self.passes = 0
        self._history: dict[str, Tensor] = {}  # name -> [3, N] (ema: mean, variance, sum of w^2) or [k, N] (last_k), on CPU

    def record(self, store: SampleScoreStore, ids: Tensor, scores: Mapping[str, Tensor]) -> None:
        """Write one pass' scores into ``store`` (a signal per name), averaged with the earlier passes."""
        for name, values in scores.items():
            if self.mode != "latest":
                values = self._average(name, ids.cpu().long(), values.detach().float().cpu()).to(values.device)
            store.record(name, ids, values)
        self.passes += 1

    def _average(self, name: str, ids: Tensor, values: Tensor) -> Tensor:
        size = int(ids.max()) + 1 if ids.numel() else 0
        rows = 3 if self.mode == "ema" else self.k
        history = self._history.get(name, torch.full((rows, 0), float("nan")))
        if history.shape[1] < size:
            history = torch.cat([history, torch.full((rows, size - history.shape[1]), float("nan"))], dim=1)
        if self.mode == "ema":
            # pandas' ewmcov recursion with adjust=False (weights sum to 1): mean, biased variance, sum of w^2
            mean, var, squares = history[0, ids], history[1, ids], history[2, ids]
            seen = torch.isfinite(mean)
            a = self.alpha
            new_mean = torch.where(seen, a * values + (1 - a) * mean, values)
            new_var = (1 - a) * (var + (mean - new_mean) ** 2) + a * (values - new_mean) ** 2
            history[0, ids] = new_mean
            history[1, ids] = torch.where(seen, new_var, torch.zeros_like(values))
            history[2, ids] = torch.where(seen, (1 - a) ** 2 * squares + a**2, torch.ones_like(values))
            averaged = history[0, ids]
            if self.std_coef > 0:
                correction = 1.0 - history[2, ids]  # 0 after one pass: no deviation yet, as the reference
                unbiased = torch.where(correction > 0, history[1, ids] / correction.clamp_min(1e-30), torch.zeros_like(values))
                averaged = averaged + self.std_coef * unbiased.clamp_min(0).sqrt()
        else:
            history = torch.roll(history, -1, dims=0)
            history[-1] = float("nan")
            history[-1, ids] = values
            averaged = torch.nanmean(history[:, ids], dim=0)
        self._history[name] = history
        return averaged

    def state_dict(self) -> dict[str, Any]:
        history = {name: values.clone() for name, values in self._history.items()}
        state = {"mode": self.mode, "passes": self.passes, "history": history, "std_coef": self.std_coef}
        return with_version(state, self.STATE_VERSION)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state_version(state, "ScoreAverager", self.STATE_VERSION)
        if state["mode"] != self.mode:
            raise ValueError(f"the checkpoint averaged scores by {state['mode']!r}, this run by {self.mode!r}")
        history = {name: values.clone() for name, values in state["history"].items()}
        if self.mode == "ema" and version < 2:  # weightwise 0.2 kept the EMA's mean only
            if self.std_coef > 0 and history:
                raise ValueError(
                    "the checkpoint's 'ema' averaging kept the mean of the passes only (weightwise 0.2), not the"
                    " deviation NLU on Data Diets adds: resume with ema_std_coef=0.0"
                )
            history = {name: torch.cat([m, torch.zeros_like(m), torch.ones_like(m)]) for name, m in history.items()}
        saved_coef = state.get("std_coef", 0.0 if version < 2 else self.std_coef)
        if self.mode == "ema" and saved_coef != self.std_coef:
            raise ValueError(f"the checkpoint's EMA added {saved_coef} x std, this run {self.std_coef} x std: pass ema_std_coef={saved_coef}")
        self.passes = int(state["passes"])
        self._history = history
