"""Plausible one-line mistakes in sample weighting and the reducer that the suite must catch.

Each test names the mistake it guards against (benchmarks/mutations.py plants them one at a time).
The reducer's multi-rank arithmetic runs in one process, as rank 1 of 2: ``TwoRanks`` stands in for
``torch.distributed`` inside :mod:`weightwise.core.collectives` and plays rank 0, whose samples are given.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tests.support.models import Classifier, blobs, indexed_loader
from tests.support.ranks import TwoRanks
from tests.support.training import trainer
from weightwise.callbacks import LossReweighting
from weightwise.core import collectives
from weightwise.losses import loss_weights, strategy_scores


def test_quadratic_divides_by_delta_squared():
    """Guards against ``1 - l~^2 / delta`` for ``1 - l~^2 / delta^2`` (the same at delta 1)."""
    scores = strategy_scores(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]), "quadratic", delta=2.0)
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.75, 1.0, 0.75, 0.0]))


def test_window_holds_the_latest_losses():
    """Guards against a loss window that keeps the run's oldest samples instead of its latest."""
    callback = LossReweighting("upper", warmup_steps=0, temperature=1.0, statistic="window", window=4)
    at_step = SimpleNamespace(global_step=5)
    for batch in ([0.0, 1.0], [2.0, 3.0], [4.0, 9.0], [5.0, 6.0]):
        weights = callback.sample_weights(torch.tensor(batch), None, at_step)
    window = torch.tensor([4.0, 9.0, 5.0, 6.0])  # the last 4 losses of the run, this batch included
    torch.testing.assert_close(weights, loss_weights(torch.tensor([5.0, 6.0]), "upper", temperature=1.0, window=window))


class LossRecorder(Classifier):
    """Records the scalar that Lightning backpropagates (the reducer's output)."""

    def __init__(self, make_loss=None) -> None:
        super().__init__(lr=0.0)
        self.make_loss = make_loss
        self.backpropagated: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        losses = super().training_step(batch, batch_idx)
        return losses if self.make_loss is None else self.make_loss(losses)

    def on_before_backward(self, loss):
        self.backpropagated.append(loss.detach())


def step_as_rank_one(monkeypatch, rank0_losses: list[float], nonfinite: str = "raise", make_loss=None):
    """One step of 5 local samples as rank 1 of 2, rank 0 holding ``rank0_losses``: (reduced loss, local losses)."""
    rank0 = torch.tensor(rank0_losses)
    monkeypatch.setattr(collectives, "dist", TwoRanks(1, [rank0, 100 + torch.arange(rank0.numel())]))
    module = LossRecorder(make_loss)
    callback = LossReweighting("linupper", warmup_steps=0, nonfinite=nonfinite)
    trainer(max_steps=1, callbacks=[callback]).fit(module, indexed_loader(5, 5))
    x, y = blobs(5).tensors
    with torch.no_grad():
        local = F.cross_entropy(module.net(x), y, reduction="none")  # lr 0: the step's own losses
    return module.backpropagated[0], local


def test_each_rank_returns_its_share_of_the_global_weighted_mean_with_unequal_batches(monkeypatch):
    """Guards against dividing by the local batch instead of the global batch over the ranks, and
    against a rank applying another rank's slice of the weights (rank 0's first B_local weights)."""
    reduced, local = step_as_rank_one(monkeypatch, [0.05, 3.0, 0.4])
    weights = loss_weights(torch.cat([torch.tensor([0.05, 3.0, 0.4]), local]), "linupper")
    # rank 1's 5 of the 8 samples; DDP averages over 2 ranks: sum_local(w l) / (8 / 2)
    torch.testing.assert_close(reduced, (weights[3:] * local).sum() / 4.0)


def test_dropping_another_ranks_nan_shifts_this_ranks_slice(monkeypatch):
    """Guards against keeping this rank's slice where it was after another rank's non-finite samples
    were dropped (the slice must move back by the samples dropped before it)."""
    reduced, local = step_as_rank_one(monkeypatch, [0.05, float("nan"), 0.4], nonfinite="drop")
    weights = loss_weights(torch.cat([torch.tensor([0.05, 0.4]), local]), "linupper")
    torch.testing.assert_close(reduced, (weights[2:] * local).sum() / 3.5)  # 7 finite samples over 2 ranks


def test_an_infinite_loss_is_dropped_like_a_nan():
    """Guards against a non-finite check that catches nan but lets +inf through."""

    def poison(losses):
        return losses.masked_fill(torch.arange(losses.numel()) == 2, float("inf"))

    module, callback = LossRecorder(poison), LossReweighting("linupper", warmup_steps=0, nonfinite="drop")
    trainer(max_steps=1, callbacks=[callback]).fit(module, indexed_loader(5, 5))
    assert callback.reducer.nonfinite_dropped == 1 and torch.isfinite(module.backpropagated[0])
