"""Token-level losses: chunked cross-entropy, per-sequence and per-document reduction, token shares."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from weightwise.losses import (
    document_ids_from_positions,
    linear_cross_entropy,
    reduce_token_losses,
    sequence_loss,
    token_cross_entropy,
    token_shares,
)


def reference_token_losses(logits, labels, shift):
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none", ignore_index=-100)
    return flat.view(labels.shape), labels != -100


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_cross_entropy_equals_the_plain_one_with_gradients(shift, chunk):
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 4:] = -100
    losses, mask = token_cross_entropy(logits, labels, shift=shift, chunk_tokens=chunk)
    expected, expected_mask = reference_token_losses(logits, labels, shift)
    assert losses.dtype == torch.float32 and torch.equal(mask, expected_mask)
    torch.testing.assert_close(losses, expected)
    (losses * mask).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    (expected * expected_mask).sum().backward()
    torch.testing.assert_close(grad, logits.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_shift_equals_cross_entropy_on_the_shifted_logits_values_and_gradients(dtype, chunk, ignore_index):
    """shift=True is F.cross_entropy(logits[:, :-1], labels[:, 1:], reduction='none'): values, mask and
    gradients, with padding and ignored tokens; the last position, which predicts nothing, gets no gradient."""
    torch.manual_seed(0)
    b, t, v = 3, 7, 13
    logits = torch.randn(b, t, v, dtype=dtype, requires_grad=True)
    labels = torch.randint(1, v, (b, t))
    labels[0, 5:] = ignore_index  # padding
    labels[1, 2] = ignore_index  # a token without a target mid-sequence
    labels[2, 0] = ignore_index  # the first label is never a target
    losses, mask = token_cross_entropy(logits, labels, ignore_index=ignore_index, shift=True, chunk_tokens=chunk)
    shifted = labels[:, 1:]
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), shifted.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(b, t - 1)
    assert losses.shape == mask.shape == (b, t - 1) and losses.dtype == torch.float32
    assert torch.equal(mask, shifted != ignore_index) and mask.sum() == (b * (t - 1) - 3)
    torch.testing.assert_close(losses, expected, rtol=0, atol=0)
    assert torch.all(losses[~mask] == 0)
    weights = torch.rand(b, t - 1)
    (losses * weights).sum().backward()
    grad, logits.grad = logits.grad.clone(), None
    (expected * weights).sum().backward()
    torch.testing.assert_close(grad, logits.grad, rtol=0, atol=0)
    assert torch.all(grad[:, -1] == 0)
    # and per sequence
    torch.testing.assert_close(
        sequence_loss(logits, labels, ignore_index=ignore_index, shift=True, chunk_tokens=chunk),
        (expected * mask).sum(1) / mask.sum(1),
    )


def test_shift_of_a_single_position_leaves_no_token():
    losses, mask = token_cross_entropy(torch.randn(2, 1, 5, requires_grad=True), torch.ones(2, 1, dtype=torch.long), shift=True)
    assert losses.shape == mask.shape == (2, 0)


class _LargeAllocations(TorchDispatchMode):
    """Records every tensor an op returns whose storage holds at least ``limit`` bytes, unless it is
    the storage of one of ``inputs`` (a view of them)."""

    def __init__(self, limit: int, *inputs: torch.Tensor) -> None:
        super().__init__()
        self.limit, self.allowed, self.found = limit, {t.untyped_storage().data_ptr() for t in inputs}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.nbytes() >= self.limit and storage.data_ptr() not in self.allowed:
                    self.found.append((str(func), tuple(tensor.shape), tensor.dtype))
        return out


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_chunked_cross_entropy_never_copies_the_logits(shift, grad):
    """No op of the forward pass allocates a tensor the size of the [B, T - 1, V] logits (the copy that
    flattening logits[:, :-1] would make, and that the checkpointed chunks would keep until backward):
    the chunks read a view of the logits themselves."""
    b, t, v, chunk = 2, 16, 64, 4
    logits = torch.randn(b, t, v, requires_grad=grad)
    labels = torch.randint(0, v, (b, t))
    with _LargeAllocations(b * (t - 1) * v * logits.element_size() // 2, logits) as tracker:
        losses, _ = token_cross_entropy(logits, labels, shift=shift, chunk_tokens=chunk)
        sequence_loss(logits, labels, shift=shift, chunk_tokens=chunk)
    assert tracker.found == []
    assert losses.shape == (b, t - 1 if shift else t)
    if grad:  # the backward pass recomputes each chunk from the same view
        losses.sum().backward()
        assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("shift", [False, True])
def test_linear_cross_entropy_never_copies_the_hidden_states(shift):
    b, t, h, v, chunk = 2, 16, 32, 16, 4
    hidden = torch.randn(b, t, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    with _LargeAllocations(b * (t - 1) * h * hidden.element_size() // 2, hidden, weight) as tracker:
        linear_cross_entropy(hidden, weight, labels, shift=shift, chunk_tokens=chunk)
    assert tracker.found == []


def test_linear_cross_entropy_never_needs_the_logits_and_matches():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    labels = torch.randint(0, 13, (3, 5))
    losses, mask = linear_cross_entropy(hidden, weight, labels, shift=True, chunk_tokens=4)
    expected, _ = reference_token_losses(hidden @ weight.T, labels, True)
    torch.testing.assert_close(losses, expected)
    losses.sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected.sum().backward()
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_sequences_and_packed_documents_are_reduced_over_their_own_valid_tokens():
    token_losses = torch.arange(12.0).view(2, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5] = False  # padding
    losses, tokens = reduce_token_losses(token_losses, mask)
    assert losses.tolist() == [2.5, 8.0] and tokens.tolist() == [6, 5]
    # row 0 packs three documents (positions restart at 0), row 1 holds one
    documents = document_ids_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]))
    losses, tokens = reduce_token_losses(token_losses, mask, documents)
    assert losses.tolist() == [1.0, 3.5, 5.0, 8.0] and tokens.tolist() == [3, 2, 1, 5]
    # a document with no valid token is left out
    mask[0, 5] = False
    assert reduce_token_losses(token_losses, mask, documents)[1].tolist() == [3, 2, 5]
    # a row that starts inside a document (positions carried across rows): its head is a document too
    documents = document_ids_from_positions(torch.tensor([[4, 5, 6, 0, 1, 0], [9, 10, 11, 12, 13, 14]]))
    losses, tokens = reduce_token_losses(token_losses, torch.ones(2, 6, dtype=torch.bool), documents)
    assert losses.tolist() == [1.0, 3.5, 5.0, 8.5] and tokens.tolist() == [3, 2, 1, 6]


def test_token_shares_turn_sequence_means_into_token_means():
    torch.manual_seed(0)
    tokens = torch.tensor([3.0, 1.0, 4.0, 2.0])
    ranks = torch.tensor([0, 0, 1, 1])
    means = torch.rand(4)
    # "global": the weighted mean of sequence means is the global token mean
    shares = token_shares(tokens, ranks, "global", num_ranks=2)
    torch.testing.assert_close((shares * means).mean(), (tokens * means).sum() / tokens.sum())
    # "rank": the mean over ranks of each rank's token mean (what plain DDP training optimises)
    shares = token_shares(tokens, ranks, "rank", num_ranks=2)
    per_rank = [(tokens[r] * means[r]).sum() / tokens[r].sum() for r in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close((shares * means).mean(), sum(per_rank) / 2)
