"""Plausible one-line mistakes in the core (the score store, the collectives) that the suite must catch.

Each test names the mistake it guards against (benchmarks/mutations.py plants them one at a time).
The collectives are exercised as one rank of two without processes: ``TwoRanks``
(``tests/support/ranks.py``) stands in for ``torch.distributed`` inside
:mod:`weightwise.core.collectives` and plays the other rank's part.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.ranks import TwoRanks
from weightwise import SampleScoreStore
from weightwise.core import collectives


def test_store_ema_weights_the_history_by_decay_and_the_new_loss_by_one_minus_decay():
    """Guards against the EMA's decay and 1 - decay swapped (invisible at decay 0.5)."""
    store = SampleScoreStore(4, ema_decay=0.9)
    store.update(torch.tensor([1]), torch.tensor([2.0]), step=0)
    store.update(torch.tensor([1]), torch.tensor([4.0]), step=1)
    assert store.ema[1].item() == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    store.update(torch.tensor([1]), torch.tensor([0.0]), step=2)
    assert store.ema[1].item() == pytest.approx(0.9 * 2.2)


def test_store_ema_starts_at_the_first_loss_not_at_zero():
    """Guards against an EMA initialised from zero (the first visit must set ema = loss)."""
    store = SampleScoreStore(3, ema_decay=0.9)
    store.update(torch.tensor([0, 2]), torch.tensor([5.0, 1.0]), step=0)
    assert store.ema.tolist()[0] == 5.0 and store.ema.tolist()[2] == 1.0


def test_store_repeated_id_keeps_its_last_occurrence_and_the_others_their_own():
    """Guards against a repeated id keeping its first occurrence instead of its last (or any other
    occurrence's values leaking into another id)."""
    store = SampleScoreStore(3, ema_decay=0.5)
    ids, losses, weights = torch.tensor([1, 0, 1, 2]), torch.tensor([7.0, 5.0, 8.0, 6.0]), torch.tensor([0.5, 1.0, 2.0, 1.5])
    store.update(ids, losses, step=0, weights=weights)
    assert store.loss.tolist() == [5.0, 8.0, 6.0] and store.ema.tolist() == [5.0, 8.0, 6.0]
    assert store.weight.tolist() == [1.0, 2.0, 1.5] and store.count.tolist() == [1, 1, 1]


@pytest.mark.parametrize("rank", [0, 1])
def test_all_gather_variable_drops_each_ranks_padding_and_returns_this_ranks_slice(monkeypatch, rank):
    """Guards against keeping the shorter rank's padding in the gathered tensor, and against a local
    slice that is off by one rank (it must point at this rank's own samples)."""
    mine = (torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0]), torch.tensor([5, 6, 7, 8, 9]))
    theirs = [torch.tensor([1.0, 2.0]), torch.tensor([100, 101])]
    monkeypatch.setattr(collectives, "dist", TwoRanks(rank, theirs))
    (values, ids), local = collectives.all_gather_variable(*mine)
    first, second = (mine, theirs) if rank == 0 else (theirs, mine)
    assert values.tolist() == first[0].tolist() + second[0].tolist()
    assert ids.tolist() == first[1].tolist() + second[1].tolist()
    assert local == (slice(0, 5) if rank == 0 else slice(2, 7))
    assert torch.equal(values[local], mine[0]) and torch.equal(ids[local], mine[1])


def test_all_reduce_sum_adds_the_other_ranks_values_and_leaves_the_input_alone(monkeypatch):
    """Guards against a reduction that modifies its input in place or skips the other rank."""
    monkeypatch.setattr(collectives, "dist", TwoRanks(0, reduce_other=lambda t: torch.full_like(t, 10.0)))
    mine = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce_sum(mine).tolist() == [11.0, 12.0]
    assert mine.tolist() == [1.0, 2.0]
