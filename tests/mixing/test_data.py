"""The mixture sampler and stream: draws by the weights, shards per rank and worker, exhausted domains, cursors."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from weightwise.mixing import MixingStream, MixtureBatchSampler, WeightTable

DOMAINS = torch.tensor([0] * 30 + [1] * 10 + [2] * 20)


def sampler(**kwargs):
    options = dict(batch_size=6, num_replicas=1, rank=0, num_batches=8)
    options.update(kwargs)
    return MixtureBatchSampler(DOMAINS, **options)


def test_draws_follow_the_weights_and_default_to_the_natural_mixture():
    natural = sampler()
    assert natural.table.weights_for(0, wait=False).tolist() == pytest.approx([0.5, 1 / 6, 1 / 3])
    only_two = sampler(weights=[0.0, 0.0, 1.0], num_batches=3)
    assert {int(DOMAINS[i]) for batch in only_two for i in batch} == {2}


def test_ranks_draw_disjoint_shares_with_the_same_weights():
    ranks = [sampler(num_replicas=2, rank=r, num_batches=2, weights=[1.0, 0.0, 0.0]) for r in (0, 1)]
    drawn = [[i for batch in s for i in batch] for s in ranks]
    assert set(drawn[0]).isdisjoint(drawn[1])  # within one pass over domain 0 (15 each): its two halves
    assert set(drawn[0]) | set(drawn[1]) <= set(range(30))
    mixed = [list(sampler(num_replicas=2, rank=r, num_batches=3)) for r in (0, 1)]
    assert [[int(DOMAINS[i]) for i in b] for b in mixed[0]] != [[int(DOMAINS[i]) for i in b] for b in mixed[1]]


def test_exhausted_domains_restart_drop_or_stop():
    restart = [i for b in sampler(weights=[0, 1, 0], num_batches=4) for i in b]  # 24 draws from 10 samples
    assert sorted(restart[:10]) == list(range(30, 40)) and sorted(restart[10:20]) == list(range(30, 40))
    dropped = [int(DOMAINS[i]) for b in sampler(weights=[0, 0.9, 0.1], exhausted="drop", num_batches=4) for i in b]
    assert dropped.count(1) == 10 and dropped.count(2) == 14  # domain 1 ran out, the rest went to domain 2
    stopped = list(sampler(weights=[0, 1, 0], exhausted="stop"))
    assert [len(b) for b in stopped] == [6, 4]  # the second batch ends at the 11th draw of domain 1
    with pytest.raises(ValueError, match="hang DDP"):
        list(sampler(exhausted="stop", num_replicas=2))


def test_a_rewound_cursor_draws_the_same_batches_again():
    s = sampler()
    first = list(s)
    state = s.state_at(5)
    again = sampler()
    again.load_state(state)
    again.next_batch = 5
    it = iter(again)
    assert [next(it) for _ in range(3)] == first[5:8]


def test_bad_domain_ids_are_refused():
    with pytest.raises(ValueError, match="outside"):
        MixtureBatchSampler([0, 3], batch_size=1, num_domains=2)
    with pytest.raises(ValueError, match="non-negative"):
        MixtureBatchSampler([0, -1], batch_size=1)
    with pytest.raises(ValueError, match="fewer samples than"):
        list(MixtureBatchSampler([0, 0, 1], batch_size=1, num_replicas=2, rank=0))


def domain_rows(d, n):
    return [{"x": torch.tensor([float(100 * d + i)])} for i in range(n)]


def stream(**kwargs):
    options = dict(batch_size=4, num_replicas=1, rank=0)
    options.update(kwargs)
    return MixingStream({"a": domain_rows(0, 40), "b": domain_rows(1, 40)}, **options)


def test_stream_items_carry_their_domain_and_shard_over_ranks():
    ranks = [list(itertools.islice(stream(num_replicas=2, rank=r, weights=[1, 0]), 12)) for r in (0, 1)]
    values = [{float(item["x"]) for item in items} for items in ranks]
    assert values[0].isdisjoint(values[1]) and all(item["domain_id"] == 0 for items in ranks for item in items)
    assert values[0] == {float(v) for v in range(0, 24, 2)}


@pytest.mark.slow  # real DataLoader worker processes
def test_stream_workers_read_disjoint_slots_and_the_shared_table(monkeypatch):
    """Two real DataLoader workers: slots 0 and 1 of each domain; weights published after the workers
    started reach them through shared memory (delay 0: batch k waits for version k)."""
    monkeypatch.setattr("weightwise.mixing.table.WAIT_SECONDS", 30.0)
    s = stream(weights=[1, 1])
    table = WeightTable(torch.tensor([0.0, 1.0]), delay=0)
    table.live = True
    s.table = table
    s.bind(2, 0)
    batches = iter(DataLoader(s, batch_size=4, num_workers=2))  # the workers start here
    for version in range(1, 4):
        table.publish(version, torch.tensor([0.0, 1.0]))
    batches = list(itertools.islice(batches, 4))
    assert all((b["domain_id"] == 1).all() for b in batches)
    by_worker = [torch.cat([batches[k]["x"] for k in range(w, 4, 2)]).flatten().tolist() for w in (0, 1)]
    assert all(v % 2 == 0 for v in by_worker[0]) and all(v % 2 == 1 for v in by_worker[1])


def test_stream_resumes_from_positions_and_handles_exhaustion():
    whole = list(itertools.islice(stream(), 12))
    resumed = stream()
    positions = torch.bincount(torch.tensor([item["domain_id"] for item in whole[:8]]), minlength=2).reshape(1, 2)
    resumed.bind(0, 2, positions)  # two batches of 4 trained
    assert [float(i["x"]) for i in itertools.islice(resumed, 4)] == [float(i["x"]) for i in whole[8:12]]
    short = MixingStream({"a": domain_rows(0, 3), "b": domain_rows(1, 40)}, batch_size=4, weights=[0.9, 0.1], exhausted="drop")
    drawn = [i["domain_id"] for i in itertools.islice(short, 20)]
    assert drawn.count(0) == 3 and len(drawn) == 20
    assert len(list(MixingStream([domain_rows(0, 3)], batch_size=2, exhausted="stop"))) == 3
    with pytest.raises(TypeError, match="mapping items"):
        next(iter(MixingStream([[1, 2]], batch_size=1)))


def test_the_table_refuses_a_draw_from_the_future_in_the_main_process():
    table = WeightTable(torch.tensor([1.0, 1.0]), delay=1)
    table.live = True
    assert table.weights_for(1, wait=False).tolist() == [0.5, 0.5]
    with pytest.raises(RuntimeError, match="Raise delay"):
        table.weights_for(2, wait=False)
    table.publish(1, torch.tensor([0.25, 0.75]))
    assert table.weights_for(2, wait=False).tolist() == [0.25, 0.75]
