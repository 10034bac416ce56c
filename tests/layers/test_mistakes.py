"""Plausible one-line mistakes in layer sampling that the suite must catch.

Each test names the mistake it guards against (benchmarks/mutations.py plants them one at a time).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from tests.support.models import TinyLlama, token_batches
from tests.support.ranks import TwoRanks
from tests.support.training import Snapshot, trainer
from weightwise.callbacks import LayerwiseSampling
from weightwise.core import collectives
from weightwise.layers import BlockInfluenceLayers, ISTLayers, LossCreditLayers, OrderedBlocks, UniformLayers


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


@pytest.mark.parametrize("policy", [UniformLayers, LossCreditLayers, OrderedBlocks, ISTLayers, BlockInfluenceLayers])
def test_a_draw_names_layers_not_positions_among_the_candidates(policy):
    """Guards against the draw returning positions in ``candidates`` instead of the layer indices they
    stand for: with layer 0 pinned the candidates are 1, 2, 3, and positions 0, 1, 2 would choose the
    pinned layer twice and the last layer never."""
    chooser = policy(4, 1, seed=0, pinned=[0])
    assert chooser.candidates == [1, 2, 3]
    chosen = [chooser.choose(period) for period in range(24)]
    assert all(len(c) == 2 and c[0] == 0 and c[1] in (1, 2, 3) for c in chosen), chosen
    assert {c[1] for c in chosen} == {1, 2, 3}  # the last layer is drawn too


def test_with_a_pinned_first_layer_the_drawn_layers_train_and_the_last_one_too():
    """The same mistake seen in training: the layers that move at each step are the pinned one and the
    drawn one, and over the run every layer trains."""
    sampling, snapshot = LayerwiseSampling("lisa", n_layers=1, interval=1, always_active=[0], seed=0), Snapshot()
    trainer(max_epochs=2, callbacks=[sampling, snapshot]).fit(TinyLlama(layers=4), token_batches())
    for step in range(len(snapshot.params) - 1):
        moved = [i for i in range(4) if not torch.equal(snapshot.params[step][i], snapshot.params[step + 1][i])]
        assert moved == sampling.history[step] and len(moved) == 2 and moved[0] == 0, (step, moved, sampling.history[step])
    assert {i for active in sampling.history for i in active} == {0, 1, 2, 3}
