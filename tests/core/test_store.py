import math

import pytest
import torch

from weightwise import SampleScoreStore
from weightwise.samplers import RandomSubsetSampler


def test_update_records_loss_ema_count_step():
    store = SampleScoreStore(ema_decay=0.5)
    store.update(torch.tensor([3, 1]), torch.tensor([2.0, 4.0]), step=0, weights=torch.tensor([0.5, 1.5]))
    assert len(store) == 4
    assert store.count.tolist() == [0, 1, 0, 1]
    assert math.isnan(store.loss[0]) and store.loss[3] == 2.0
    assert store.last_step.tolist() == [-1, 0, -1, 0]
    assert store.weight[1] == 1.5
    store.update(torch.tensor([3]), torch.tensor([4.0]), step=5)
    assert store.ema[3] == 0.5 * 2.0 + 0.5 * 4.0
    assert store.loss[3] == 4.0 and store.count[3] == 2 and store.last_step[3] == 5
    assert store.seen.tolist() == [False, True, False, True]


def test_repeated_ids_in_one_batch_keep_the_last_occurrence_and_count_once():
    store = SampleScoreStore(num_samples=3)
    store.update(torch.tensor([2, 0, 2]), torch.tensor([1.0, 5.0, 9.0]), step=1)
    assert store.loss[2] == 9.0 and store.count[2] == 1 and store.count[0] == 1


def test_grows_past_preallocation_and_keeps_values():
    store = SampleScoreStore(num_samples=2)
    store.update(torch.tensor([1]), torch.tensor([1.0]), step=0)
    store.update(torch.tensor([100]), torch.tensor([2.0]), step=1)
    assert len(store) == 101 and store.loss[1] == 1.0 and store.loss[100] == 2.0


def test_a_sampler_reserves_the_dataset_so_shuffled_ids_do_not_double_the_store():
    grown, reserved = SampleScoreStore(fields=["loss"]), SampleScoreStore(fields=["loss"])
    RandomSubsetSampler(1000).attach_scores(reserved)
    for ids in torch.randperm(1000).split(64):  # an epoch of shuffled ids
        grown.update(ids, torch.ones(ids.numel()), step=0)
        reserved.update(ids, torch.ones(ids.numel()), step=0)
    assert len(grown) == len(reserved) == 1000 and torch.equal(grown.loss, reserved.loss)
    assert reserved.nbytes == 1000 * 4  # exactly N float32 losses
    assert grown.nbytes > 1000 * 4  # learning the size from the ids overshoots


def test_state_dict_round_trip():
    store = SampleScoreStore(ema_decay=0.8)
    store.update(torch.arange(5), torch.arange(5).float(), step=3)
    restored = SampleScoreStore()
    restored.load_state_dict(store.state_dict())
    assert restored.ema_decay == 0.8 and len(restored) == 5
    for field in ("loss", "ema", "count", "last_step"):
        assert torch.equal(getattr(restored, field), getattr(store, field))
    with pytest.raises(KeyError, match="lacks"):
        restored.load_state_dict({"loss": torch.zeros(1)})


def test_bad_input():
    store = SampleScoreStore()
    with pytest.raises(ValueError, match="1-D"):
        store.update(torch.arange(3), torch.rand(4), step=0)
    with pytest.raises(ValueError, match="non-negative"):
        store.update(torch.tensor([-1]), torch.rand(1), step=0)
    with pytest.raises(ValueError, match="ema_decay"):
        SampleScoreStore(ema_decay=1.0)


def test_million_sample_store_updates_only_the_batch():
    # Not a timing assertion (those live in benchmarks/): a Python loop over N would show up as a
    # touched-entry count of N; here only the batch's entries change.
    store = SampleScoreStore(num_samples=1_000_000)
    ids = torch.randint(0, 1_000_000, (4096,))
    store.update(ids, torch.rand(4096), step=0)
    assert int(store.count.sum()) == ids.unique().numel()


def test_named_signals_are_recorded_grown_and_checkpointed():
    store = SampleScoreStore()
    store.update(torch.arange(3), torch.rand(3), step=0)
    store.record("el2n", torch.tensor([0, 2]), torch.tensor([0.5, 0.7]))
    store.update(torch.tensor([9]), torch.rand(1), step=1)  # grows the signal too
    el2n = store.signal("el2n")
    assert len(el2n) == 10 and el2n[0] == 0.5 and el2n[2] == 0.7 and math.isnan(el2n[1]) and math.isnan(el2n[9])
    restored = SampleScoreStore()
    restored.load_state_dict(store.state_dict())
    assert torch.equal(restored.signal("el2n").nan_to_num(-1), el2n.nan_to_num(-1))
    assert restored.signal_names == ["el2n"]


def test_unknown_signal_error_names_the_fix():
    with pytest.raises(KeyError, match="'scores'"):
        SampleScoreStore().signal("grand")
    with pytest.raises(ValueError, match="built-in"):
        SampleScoreStore().record("loss", torch.arange(2), torch.rand(2))


def test_memory_map_moves_a_live_store_to_files_and_keeps_writing_there(tmp_path):
    store = SampleScoreStore(fields=["loss", "count"])
    store.update(torch.tensor([0, 2]), torch.tensor([1.5, 2.5]), step=0)
    store.record("el2n", torch.tensor([2]), torch.tensor([0.25]))
    (tmp_path / "loss.bin").write_bytes(b"\x00" * 40)  # a file left by an earlier run of the same size: replaced
    store.memory_map(tmp_path, 10)
    assert len(store) == 3 and store.device == torch.device("cpu")
    assert store.loss[:3].nan_to_num(-1).tolist() == [1.5, -1.0, 2.5] and store.count.tolist() == [1, 0, 1]
    store.update(torch.tensor([9]), torch.tensor([7.0]), step=1)  # later writes land in the files
    on_disk = torch.from_file(str(tmp_path / "loss.bin"), size=10, dtype=torch.float32)
    assert on_disk.nan_to_num(-1).tolist() == [1.5, -1, 2.5] + [-1] * 6 + [7.0]
    assert torch.from_file(str(tmp_path / "count.bin"), size=10, dtype=torch.int32).tolist() == [1, 0, 1] + [0] * 6 + [1]
    assert torch.from_file(str(tmp_path / "signal_el2n.bin"), size=10, dtype=torch.float32)[2] == 0.25
    with pytest.raises(IndexError, match="memory-mapped"):  # fixed size
        store.update(torch.tensor([10]), torch.tensor([1.0]), step=2)
    with pytest.raises(ValueError, match="fixed size"):
        SampleScoreStore(fields=["loss"]).memory_map(tmp_path / "empty")  # no size to fix
