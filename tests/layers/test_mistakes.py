"""Plausible one-line mistakes in layer sampling that the suite must catch.

Each test names the mistake it guards against (benchmarks/mutations.py plants them one at a time).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from tests.support.models import TinyLlama, token_batches
from tests.support.ranks import TwoRanks
from tests.support.training import trainer
from weightwise.callbacks import LayerwiseSampling
from weightwise.core import collectives
from weightwise.layers import ISTLayers, LossCreditLayers


def test_ist_probes_suppress_the_layers_whose_suppression_helped_more_often():
    """Guards against probes drawn by sigmoid(-s) instead of sigmoid(s): a layer whose suppression
    lowered the loss (high s) must be probed more, not less."""
    policy = ISTLayers(8, 2, probes=2)
    policy.scores = torch.tensor([2.0, 2.0, 2.0, 2.0, -2.0, -2.0, -2.0, -2.0])
    counts = torch.zeros(8)
    for step in range(10, 1010, 10):
        for layers in policy.probe_sets(step):
            counts[layers] += 1
    assert counts[:4].sum() > 3 * counts[4:].sum()


def test_loss_credit_smooths_with_beta_on_the_new_reward():
    """Guards against the smoothing's beta and 1 - beta swapped (the same at beta 0.5)."""
    policy = LossCreditLayers(4, 2, beta=0.25)
    active = policy.choose(0)
    policy.end_period(2.0)
    policy.choose(1)
    policy.active = active
    policy.end_period(1.0)  # reward: the loss fell by 1
    assert [float(policy.scores[i]) for i in active] == [0.25, 0.25]


class StepLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_loss_credit_is_fed_the_mean_loss_of_each_period():
    """Guards against feeding the policy the period's summed loss instead of its mean."""
    sampling, recorder = LayerwiseSampling("loss_credit", n_layers=2, interval=2), StepLosses()
    trainer(max_epochs=1, callbacks=[sampling, recorder]).fit(TinyLlama(layers=2), token_batches())
    assert len(recorder.losses) == 4  # periods 0 and 1; period 0 ended when period 1 began
    assert sampling.chooser.previous_mean == pytest.approx(sum(recorder.losses[:2]) / 2)


def test_ist_probe_losses_are_averaged_over_the_ranks(monkeypatch):
    """Guards against summing the ranks' probe losses instead of averaging them: two ranks that
    probe the same batch must learn exactly what one process learns."""

    def run() -> torch.Tensor:
        sampling = LayerwiseSampling("ist", probe_every=2, seed=0)
        trainer(max_steps=3, callbacks=[sampling]).fit(TinyLlama(layers=4), token_batches())
        return sampling.importance.clone()

    alone = run()
    monkeypatch.setattr(collectives, "dist", TwoRanks(0))  # the other rank's probe losses equal this one's
    assert torch.equal(run(), alone) and alone.abs().sum() > 0
