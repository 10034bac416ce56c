import pytest
import torch
import torch.nn.functional as F

from weightwise.losses import check_per_sample_loss, sequence_loss


def test_sequence_loss_is_masked_mean_per_sequence():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, -100, -100], [0, 1, 2, 3]])
    out = sequence_loss(logits, labels)
    first = F.cross_entropy(logits[0, :2], labels[0, :2])
    second = F.cross_entropy(logits[1], labels[1])
    assert torch.allclose(out, torch.stack([first, second]))


def test_sequence_loss_shift_matches_causal_lm_convention():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 7)
    labels = torch.randint(0, 7, (3, 6))
    out = sequence_loss(logits, labels, shift=True)
    expected = torch.stack([F.cross_entropy(logits[i, :-1], labels[i, 1:]) for i in range(3)])
    assert torch.allclose(out, expected)
    # and its token-weighted mean equals HF-style global mean when lengths are equal
    assert torch.allclose(out.mean(), F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1)))


def test_sequence_loss_empty_sequence_is_zero_and_gradients_flow():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.tensor([[-100, -100, -100], [1, 2, 3]])
    out = sequence_loss(logits, labels)
    assert out[0].item() == 0.0
    out.sum().backward()
    assert logits.grad[0].abs().sum() == 0 and logits.grad[1].abs().sum() > 0


def test_sequence_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        sequence_loss(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


def test_check_per_sample_loss_errors_name_the_fix():
    with pytest.raises(ValueError, match="reduction='none'"):
        check_per_sample_loss(torch.tensor(1.0))
    with pytest.raises(ValueError, match="sequence_loss"):
        check_per_sample_loss(torch.rand(2, 3))
    with pytest.raises(ValueError, match="exactly one loss per sample"):
        check_per_sample_loss(torch.rand(3), batch_size=4)
    with pytest.raises(TypeError, match="floating-point"):
        check_per_sample_loss(torch.ones(3, dtype=torch.long))
    losses = torch.rand(4)
    assert check_per_sample_loss(losses, batch_size=4) is losses
