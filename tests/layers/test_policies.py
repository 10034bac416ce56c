"""The layer-choice policies against hand-computed draws and the references' rules."""

import math

import pytest
import torch

from weightwise.layers import ISTLayers, LossCreditLayers, OrderedBlocks, UniformLayers


def test_lisa_draws_uniformly_from_the_seed_and_period():
    policy = UniformLayers(6, 2, seed=3)
    for period in range(5):
        generator = torch.Generator().manual_seed(3 * 100_003 + period)
        assert policy.choose(period) == sorted(torch.randperm(6, generator=generator)[:2].tolist())
    assert UniformLayers(6, 2, seed=4).choose(0) != policy.choose(0) or UniformLayers(6, 2, seed=4).choose(1) != policy.choose(1)


def test_pinned_layers_come_on_top_of_the_drawn_ones():
    policy = UniformLayers(6, 1, seed=0, pinned=[0, 5])
    for period in range(10):
        chosen = policy.choose(period)
        assert len(chosen) == 3 and {0, 5} <= set(chosen)
    with pytest.raises(ValueError, match="pinned"):
        UniformLayers(6, 5, pinned=[0, 5])
    with pytest.raises(ValueError, match="outside the stack"):
        UniformLayers(6, 1, pinned=[6])


@pytest.mark.parametrize(
    "order, expected",
    [("ascending", [[0], [1], [2], [3], [0]]), ("descending", [[3], [2], [1], [0], [3]])],
)
def test_badam_orders(order, expected):
    policy = OrderedBlocks(4, 1, order=order)
    assert [policy.choose(p) for p in range(5)] == expected


def test_badam_random_order_visits_every_layer_once_per_cycle_in_a_fresh_order():
    policy = OrderedBlocks(5, 1, seed=1, order="random")
    cycles = [[policy.choose(p)[0] for p in range(c * 5, c * 5 + 5)] for c in range(4)]
    assert all(sorted(cycle) == list(range(5)) for cycle in cycles)
    assert len({tuple(cycle) for cycle in cycles}) > 1
    two = OrderedBlocks(4, 2, order="ascending")  # blocks of two layers
    assert [two.choose(p) for p in range(3)] == [[0, 1], [2, 3], [0, 1]]


def test_ist_update_is_the_references_reinforce_step():
    policy = ISTLayers(4, 1, learning_rate=10.0)
    policy.scores = torch.tensor([0.0, 1.0, -1.0, 0.5])
    sets, losses = [[0, 1], [1, 2], [2, 3]], [1.0, 2.0, 3.0]
    p = torch.sigmoid(policy.scores.double())
    rewards = [math.exp(-loss) for loss in losses]
    baseline = sum(rewards) / 3
    expected = policy.scores.double().clone()
    for layers, reward in zip(sets, rewards):
        for i in layers:
            expected[i] += 10.0 * (reward - baseline) * p[i] * (1 - p[i])
    policy.learn(sets, losses)
    torch.testing.assert_close(policy.scores.double(), expected, atol=1e-6, rtol=0)
    # suppressing layers 0 and 1 gave the lowest loss: they are less important now, drawn less often
    assert policy.importance[0] < 0 and policy.scores[0] > 0


def test_ist_probes_suppress_half_the_layers_in_distinct_sets_from_step_10():
    policy = ISTLayers(8, 2)
    assert [policy.wants_probes(s) for s in (0, 5, 10, 20)] == [False, False, True, True]
    sets = policy.probe_sets(10)
    assert len(sets) == 3 and all(len(s) == 4 for s in sets) and len({tuple(s) for s in sets}) == 3
    assert policy.probe_sets(10) == sets  # the same on every rank


def test_ist_draws_less_important_layers_less_often():
    policy = ISTLayers(4, 1)
    policy.scores = torch.tensor([5.0, -5.0, 0.0, 0.0])  # layer 0: suppressing it helped
    counts = torch.zeros(4)
    for period in range(400):
        counts[policy.choose(period)] += 1
    assert counts[0] < 10 and counts[1] > counts[2]


def test_loss_credit_rewards_active_layers_with_the_loss_decrease():
    policy = LossCreditLayers(4, 2, beta=0.5)
    active = policy.choose(0)
    policy.end_period(2.0)
    policy.choose(1)
    policy.active = active
    policy.end_period(1.0)
    assert all(policy.scores[i] == 0.5 for i in active)
