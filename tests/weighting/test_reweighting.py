"""Sow et al.'s weights against hand-computed cases and the authors' formulas."""

import math

import pytest
import torch

from weightwise.losses import loss_weights, normalize_losses, strategy_scores


def test_normalize_maps_min_max_to_minus_plus_delta():
    out = normalize_losses(torch.tensor([1.0, 2.0, 3.0, 5.0]), delta=2.0)
    # delta * (2 l - max - min) / (max - min) = 2 * (2l - 6) / 4
    assert torch.allclose(out, torch.tensor([-2.0, -1.0, 0.0, 2.0]))


def test_normalize_clamps_the_spread_at_1e_6_as_the_reference():
    assert torch.equal(normalize_losses(torch.full((4,), 0.7)), torch.zeros(4))
    # a spread of 1e-9 is divided by 1e-6, not by itself: l~ stays near 0, weights near uniform
    near = torch.tensor([1.0, 1.0 + 1e-9], dtype=torch.float64)
    assert normalize_losses(near).abs().max() < 1e-2
    assert torch.allclose(loss_weights(near, "linupper"), torch.ones(2, dtype=torch.float64), atol=1e-2)


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("linupper", [0.0, 0.5, 1.0, 1.0, 1.0]),  # min(l~ + 1, 1)
        ("quadratic", [0.0, 0.75, 1.0, 0.75, 0.0]),  # 1 - l~^2
        ("mid", [0.0, 0.75, 1.0, 0.75, 0.0]),  # the reference's name of quadratic
        ("extremes", [1.0, 0.5, 0.0, 0.5, 1.0]),  # |l~|
        ("upper", [0.0, 0.25, 0.5, 0.75, 1.0]),  # 0.5 l~ + 0.5
        ("uniform", [0.0, 0.0, 0.0, 0.0, 0.0]),
    ],
)
def test_strategy_scores_hand_computed(strategy, expected):
    normalized = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert torch.allclose(strategy_scores(normalized, strategy), torch.tensor(expected))


def test_linupper_weights_hand_computed():
    # losses 0, 1, 2 -> l~ = -1, 0, 1 -> f = 0, 1, 1 -> w = 3 * softmax(f / r), r = 1
    w = loss_weights(torch.tensor([0.0, 1.0, 2.0]), "linupper", temperature=1.0)
    z = 1 + 2 * math.e
    assert torch.allclose(w, torch.tensor([3 / z, 3 * math.e / z, 3 * math.e / z]))


def test_default_temperature_is_the_references_0_4():
    # f = 0, 1, 1 with r = 0.4: w ∝ (1, e^2.5, e^2.5)
    w = loss_weights(torch.tensor([0.0, 1.0, 2.0]), "linupper")
    z = 1 + 2 * math.exp(2.5)
    assert torch.allclose(w, torch.tensor([3 / z, 3 * math.exp(2.5) / z, 3 * math.exp(2.5) / z]))


def test_quadratic_downweights_both_extremes_with_temperature():
    # losses 0, 1, 2 -> f = 0, 1, 0 ; r = 0.5 -> w ∝ (1, e^2, 1)
    w = loss_weights(torch.tensor([0.0, 1.0, 2.0]), "quadratic", temperature=0.5)
    z = 2 + math.e**2
    assert torch.allclose(w, torch.tensor([3 / z, 3 * math.e**2 / z, 3 / z]))


def test_extremes_with_delta():
    # delta 2: l~ = -2, 0, 2 -> f = 2, 0, 2 -> w ∝ (e^2, 1, e^2), r = 1
    w = loss_weights(torch.tensor([0.0, 1.0, 2.0]), "extremes", delta=2.0, temperature=1.0)
    z = 1 + 2 * math.e**2
    assert torch.allclose(w, torch.tensor([3 * math.e**2 / z, 3 / z, 3 * math.e**2 / z]))


def test_window_statistics_hand_computed_and_equal_to_the_batch_formula_on_the_batch():
    batch = torch.tensor([0.0, 1.0, 2.0])
    assert torch.allclose(loss_weights(batch, "upper", window=batch), loss_weights(batch, "upper"))
    # one sample, window [0, 4, 1]: range 0..4, l~(1) = (2 - 4) / 4 = -0.5, upper f = 0.25;
    # window f = (0, 1, 0.25) ; r = 1: w = e^0.25 / mean(e^0, e^1, e^0.25)
    w = loss_weights(torch.tensor([1.0]), "upper", temperature=1.0, window=torch.tensor([0.0, 4.0, 1.0]))
    expected = math.exp(0.25) / ((1 + math.e + math.exp(0.25)) / 3)
    assert torch.allclose(w, torch.tensor([expected]))


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes", "upper", "uniform"])
def test_weights_mean_one_nonnegative_detached(strategy):
    losses = (torch.rand(257) * 5).requires_grad_()
    w = loss_weights(losses, strategy, temperature=1.0)
    assert not w.requires_grad
    assert (w >= 0).all()
    assert torch.allclose(w.mean(), torch.tensor(1.0), atol=1e-5)
    # bounded by exp(+-delta/r) around the mean
    assert w.max() <= math.e * 1.0001 and w.min() >= 0.0


def test_uniform_is_exactly_one():
    assert torch.equal(loss_weights(torch.rand(10), "uniform"), torch.ones(10))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown reweighting strategy"):
        loss_weights(torch.rand(3), "cubic")
    with pytest.raises(ValueError, match="positive"):
        loss_weights(torch.rand(3), "linupper", temperature=0)
    with pytest.raises(ValueError, match="1-D"):
        loss_weights(torch.rand(3, 2), "linupper")
    with pytest.raises(ValueError, match="finite"):
        loss_weights(torch.tensor([1.0, float("nan")]), "linupper")
