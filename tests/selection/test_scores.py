import pytest
import torch
import torch.nn.functional as F

from weightwise.losses import el2n, grand_last_layer


def test_el2n_hand_computed():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    out = el2n(logits, torch.tensor([0, 1]))
    expected = torch.tensor([(0.3**2 + 0.2**2 + 0.1**2) ** 0.5, (0.1**2 + 0.9**2 + 0.8**2) ** 0.5])
    assert torch.allclose(out, expected, atol=1e-6)


def test_grand_last_layer_equals_the_true_last_layer_gradient_norm():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    features, labels = torch.randn(5, 6), torch.randint(0, 4, (5,))
    bound = grand_last_layer(layer(features), labels, features)
    for i in range(5):
        layer.zero_grad()
        F.cross_entropy(layer(features[i : i + 1]), labels[i : i + 1]).backward()
        true_norm = torch.sqrt(layer.weight.grad.square().sum() + layer.bias.grad.square().sum())
        assert torch.allclose(bound[i], true_norm, atol=1e-5)


def test_scores_are_detached_and_validate_shapes():
    logits = torch.randn(3, 4, requires_grad=True)
    assert not el2n(logits, torch.tensor([0, 1, 2])).requires_grad
    with pytest.raises(ValueError, match=r"logits \[B, C\]"):
        el2n(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"features \[B, H\]"):
        grand_last_layer(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.randn(2, 5))
