"""Online batch selection: the selection rules, slicing batches, and real Trainer runs."""

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tests.support.models import Classifier, TokenLossLM, blobs, indexed_loader, padded_token_batches
from tests.support.training import trainer
from weightwise.callbacks import LossReweighting, OnlineBatchSelection, SampleWeightCallback
from weightwise.selection.online import row_scores, select_indices, slice_batch


def test_top_keeps_the_highest_scores_as_rho_loss():
    assert select_indices(torch.tensor([0.1, 3.0, 0.2, 2.0, 5.0]), 0.4, "top").tolist() == [1, 4]
    assert select_indices(torch.tensor([1.0, 2.0]), 0.1, "top").tolist() == [1]  # at least one row


def test_sample_draws_by_loss_rank_as_composer():
    """p ∝ ((rank + 0.5) / B) ** (1 / keep - 1): with keep = 0.5, linear in the rank."""
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0])  # ascending ranks: 1, 3, 2, 0
    counts = torch.zeros(4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4000):
        rows = select_indices(scores, 0.25, "sample", generator)  # one row per draw: p exactly the formula
        counts[rows] += 1
    rank = torch.tensor([3, 0, 2, 1], dtype=torch.float64)
    expected = ((rank + 0.5) / 4) ** 3
    torch.testing.assert_close(counts.double() / 4000, expected / expected.sum(), atol=0.02, rtol=0)
    two = select_indices(scores, 0.5, "sample", generator)
    assert two.numel() == 2 and two.unique().numel() == 2  # without replacement


def test_slicing_every_batch_layout():
    rows = torch.tensor([0, 2])
    x, y = torch.arange(12).view(3, 4), torch.tensor([7, 8, 9])
    assert torch.equal(slice_batch(x, rows, 3), x[[0, 2]])
    sliced = slice_batch({"input_ids": x, "labels": y, "name": "news", "scale": torch.tensor(2.0)}, rows, 3)
    assert torch.equal(sliced["labels"], torch.tensor([7, 9])) and sliced["name"] == "news" and sliced["scale"] == 2.0
    Pair = namedtuple("Pair", ["x", "sample_id"])
    pair = slice_batch(Pair(x, y), rows, 3)
    assert isinstance(pair, Pair) and torch.equal(pair.sample_id, torch.tensor([7, 9]))
    assert [t.tolist() for t in slice_batch([x, y], rows, 3)][1] == [7, 9]
    with pytest.raises(TypeError, match="slice_batch="):
        slice_batch(object(), rows, 3)


class Seen(SampleWeightCallback):
    """The per-sample losses and ids the reducer saw at each step."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def sample_weights(self, losses, sample_ids, trainer):
        self.steps.append((losses.clone(), None if sample_ids is None else sample_ids.clone()))


def test_only_the_highest_loss_rows_reach_the_step_and_the_ledger_counts_them():
    model, seen = Classifier(lr=0.0), Seen()  # frozen: the losses can be recomputed
    selection = OnlineBatchSelection(keep=0.5, method="top", start=0, end=1.0, interrupt=0)
    trainer(max_epochs=1, callbacks=[selection, seen]).fit(model, indexed_loader(32, 8))
    x, y = blobs(32).tensors
    losses = F.cross_entropy(model.net(x), y, reduction="none").detach()
    for step, (kept_losses, ids) in enumerate(seen.steps):
        batch = torch.arange(8 * step, 8 * step + 8)
        expected = batch[torch.topk(losses[batch], 4).indices.sort().values]
        assert torch.equal(ids, expected) and torch.allclose(kept_losses, losses[expected])
    assert selection.ledger == {"steps_selected": 4, "samples_forwarded": 32, "samples_backpropagated": 16, "samples_skipped": 16}


def test_window_and_interrupt_follow_composer():
    seen = Seen()
    selection = OnlineBatchSelection(keep=0.5, start=0.5, end=0.9, interrupt=2)  # Composer's defaults
    trainer(max_epochs=1, callbacks=[selection, seen]).fit(Classifier(), indexed_loader(80, 8))  # 10 steps
    sizes = [losses.numel() for losses, _ in seen.steps]
    # steps 5..8 are in the window; batch_idx 5 and 7 train whole ((batch_idx + 1) % 2 == 0)
    assert sizes == [8, 8, 8, 8, 8, 8, 4, 8, 4, 8]


def test_reference_losses_are_subtracted_as_rho_loss():
    seen = Seen()
    reference = lambda batch: torch.where(batch.sample_id % 2 == 0, 100.0, 0.0)  # noqa: E731  even ids: irreducible
    selection = OnlineBatchSelection(keep=0.5, method="top", start=0, end=1.0, interrupt=0, reference_loss=reference)
    trainer(max_epochs=1, callbacks=[selection, seen]).fit(Classifier(), indexed_loader(16, 8))
    assert all((ids % 2 == 1).all() for _, ids in seen.steps)


def test_streams_without_ids_and_token_losses_are_selected_by_row():
    seen = Seen()
    selection = OnlineBatchSelection(keep=0.5, method="top", start=0, end=1.0, interrupt=0)
    trainer(max_steps=2, callbacks=[selection, LossReweighting("linupper", warmup_steps=0), seen]).fit(
        Classifier(), DataLoader(blobs(16), batch_size=8)
    )
    assert [losses.numel() for losses, ids in seen.steps] == [4, 4] and seen.steps[0][1] is None
    tokens = Seen()
    trainer(max_steps=2, callbacks=[OnlineBatchSelection(keep=0.5, start=0, end=1.0, interrupt=0), tokens]).fit(
        TokenLossLM("tokens"), padded_token_batches(n=8, batch_size=4)
    )
    assert [losses.numel() for losses, _ in tokens.steps] == [2, 2]


def test_packed_rows_are_scored_by_their_token_mean_and_reweighted_per_document():
    model, seen = TokenLossLM("packed", lr=0.0), Seen()  # frozen: the row scores can be recomputed
    selection = OnlineBatchSelection(keep=0.5, method="top", start=0, end=1.0, interrupt=0)
    loader = padded_token_batches(n=8, batch_size=4)
    trainer(max_steps=2, callbacks=[selection, LossReweighting("linupper", warmup_steps=0), seen]).fit(model, loader)
    for step, batch in enumerate(loader):
        output = model.training_step(batch, step)
        mask = output["mask"]
        rows = torch.where(mask, output["loss"], 0.0).sum(1) / mask.sum(1)  # each row's mean over its valid tokens
        kept = {int(i) for i in torch.topk(rows, 2).indices}
        # the step saw the kept rows' documents: 3 documents of 5 tokens per 15-token row, minus padded ones
        expected = sum(int(((mask[i].view(3, 5)).any(dim=1)).sum()) for i in kept)
        assert seen.steps[step][0].numel() == expected


def test_a_fractional_window_on_an_endless_stream_is_refused():
    stream = DataLoader(Endless(), batch_size=8)
    with pytest.raises(Exception, match="max_steps"):
        trainer(max_epochs=1, callbacks=[OnlineBatchSelection()]).fit(Classifier(), stream)
    seen = Seen()  # a window in steps works without knowing the run's length
    trainer(max_epochs=1, limit_train_batches=3, callbacks=[OnlineBatchSelection(start=1, end=2, interrupt=0), seen]).fit(
        Classifier(), stream
    )
    assert [losses.numel() for losses, _ in seen.steps] == [8, 4, 8]


class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        x, y = blobs(8).tensors
        while True:
            yield from zip(x, y)


def test_row_scores_are_token_means_and_refuse_token_losses_without_a_matching_mask():
    losses, mask = torch.tensor([[1.0, 3.0, 8.0], [2.0, 5.0, 9.0]]), torch.tensor([[True, True, False], [False, False, False]])
    assert row_scores({"loss": losses, "mask": mask}).tolist() == [2.0, 0.0]  # padding never counts; an empty row scores 0
    with pytest.raises(ValueError, match="without a 'mask'"):
        row_scores({"loss": losses})
    with pytest.raises(ValueError, match="same shape"):
        row_scores({"loss": losses, "mask": mask[:, :2]})


def test_bad_settings():
    for kwargs in ({"keep": 0.0}, {"method": "random"}, {"start": 0.9, "end": 0.5}, {"interrupt": -1}):
        with pytest.raises(ValueError):
            OnlineBatchSelection(**kwargs)
