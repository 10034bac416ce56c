import pytest
import torch

from weightwise.losses import weighted_mean


def test_unit_weights_reproduce_mean_bit_for_bit():
    losses = torch.rand(37, dtype=torch.float32) * 3
    assert torch.equal(weighted_mean(losses, torch.ones(37)), losses.mean())


def test_weighted_mean_and_denominator():
    losses = torch.tensor([1.0, 2.0, 3.0])
    weights = torch.tensor([0.5, 1.0, 1.5])
    assert torch.allclose(weighted_mean(losses, weights), torch.tensor((0.5 + 2 + 4.5) / 3))
    assert torch.allclose(weighted_mean(losses, weights, denominator=4.0), torch.tensor(7.0 / 4))


def test_gradient_is_scaled_by_weight():
    losses = torch.tensor([1.0, 2.0], requires_grad=True)
    weighted_mean(losses, torch.tensor([0.0, 2.0])).backward()
    assert torch.equal(losses.grad, torch.tensor([0.0, 1.0]))


def test_rejects_attached_weights_and_shape_mismatch():
    with pytest.raises(ValueError, match="detached"):
        weighted_mean(torch.rand(2), torch.rand(2, requires_grad=True))
    with pytest.raises(ValueError, match="one shape"):
        weighted_mean(torch.rand(2), torch.rand(3))
