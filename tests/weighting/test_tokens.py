"""Token-level losses: chunked cross-entropy, per-sequence and per-document reduction, token shares."""

import pytest
import torch
import torch.nn.functional as F

from weightwise.losses import (
    document_ids_from_positions,
    linear_cross_entropy,
    reduce_token_losses,
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
