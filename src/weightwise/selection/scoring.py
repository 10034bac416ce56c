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

from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

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
        for batch in loader:
            batch = to_device(batch)
            for name, values in score_fn(pl_module, batch).items():
                scores.setdefault(name, []).append(values.detach().float())
            ids.append(ids_of(batch))
    finally:
        pl_module.train(was_training)
    device = next(iter(scores.values()))[0].device if scores else torch.device("cpu")
    return torch.cat(ids).to(device) if ids else torch.zeros(0, dtype=torch.long), {n: torch.cat(v) for n, v in scores.items()}


def gather_scores(ids: Tensor, scores: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Every rank's ids and scores, in rank order, on every rank (a collective)."""
    names = sorted(scores)
    gathered, _ = collectives.all_gather_variable(ids.long(), *(scores[name].float() for name in names))
    return gathered[0], dict(zip(names, gathered[1:]))


class ScoreAverager:
    """Combines the scores of successive passes into the store's signals (NLU on Data Diets).

    * ``"latest"``: the last pass only (Data Diet within one run; NLU's default without averaging);
    * ``"ema"``: ``s <- alpha x + (1 - alpha) s`` (pandas ``ewm(alpha, adjust=False)``; NLU's CLI
      uses ``alpha = 0.8``), the first pass sets ``s``;
    * ``"last_k"``: the mean of the last ``k`` passes (NLU's ``avg``).

    The averages are kept here (``[N]``, or ``[k, N]`` for ``"last_k"``), apart from the store, whose
    signal of the same name a training step may overwrite between passes; each pass writes the
    average into the store, where the samplers read it.

    Args:
        mode: see above.
        alpha: the EMA's weight of the newest pass.
        k: passes averaged by ``"last_k"``.

    Raises:
        ValueError: an unknown mode, ``alpha`` outside (0, 1] or ``k`` below 1.
    """

    STATE_VERSION = 1

    def __init__(self, mode: Averaging = "latest", *, alpha: float = 0.8, k: int = 3) -> None:
        if mode not in ("latest", "ema", "last_k"):
            raise ValueError(f"averaging must be 'latest', 'ema' or 'last_k', got {mode!r}")
        if not 0.0 < alpha <= 1.0 or k < 1:
            raise ValueError(f"alpha must be in (0, 1] and k >= 1, got alpha={alpha}, k={k}")
        self.mode: Averaging = mode
        self.alpha = alpha
        self.k = k
        self.passes = 0
        self._history: dict[str, Tensor] = {}  # name -> [N] (ema) or [k, N] (last_k), on CPU

    def record(self, store: SampleScoreStore, ids: Tensor, scores: Mapping[str, Tensor]) -> None:
        """Write one pass' scores into ``store`` (a signal per name), averaged with the earlier passes."""
        for name, values in scores.items():
            if self.mode != "latest":
                values = self._average(name, ids.cpu().long(), values.detach().float().cpu()).to(values.device)
            store.record(name, ids, values)
        self.passes += 1

    def _average(self, name: str, ids: Tensor, values: Tensor) -> Tensor:
        size = int(ids.max()) + 1 if ids.numel() else 0
        rows = 1 if self.mode == "ema" else self.k
        history = self._history.get(name, torch.full((rows, 0), float("nan")))
        if history.shape[1] < size:
            history = torch.cat([history, torch.full((rows, size - history.shape[1]), float("nan"))], dim=1)
        if self.mode == "ema":
            previous = history[0, ids]
            history[0, ids] = torch.where(torch.isfinite(previous), self.alpha * values + (1 - self.alpha) * previous, values)
            averaged = history[0, ids]
        else:
            history = torch.roll(history, -1, dims=0)
            history[-1] = float("nan")
            history[-1, ids] = values
            averaged = torch.nanmean(history[:, ids], dim=0)
        self._history[name] = history
        return averaged

    def state_dict(self) -> dict[str, Any]:
        history = {name: values.clone() for name, values in self._history.items()}
        return with_version({"mode": self.mode, "passes": self.passes, "history": history}, self.STATE_VERSION)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state_version(state, "ScoreAverager", self.STATE_VERSION)
        if state["mode"] != self.mode:
            raise ValueError(f"the checkpoint averaged scores by {state['mode']!r}, this run by {self.mode!r}")
        self.passes = int(state["passes"])
        self._history = {name: values.clone() for name, values in state["history"].items()}
