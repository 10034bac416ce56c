import pytest
import torch

from weightwise.samplers import EpochPlan, EpochSampler, RandomSubsetSampler


class Fixed(EpochSampler):
    def __init__(self, indices, **kwargs):
        super().__init__(10, **kwargs)
        self.indices = torch.tensor(indices)

    def plan_epoch(self, epoch, generator):
        return EpochPlan(self.indices)


def test_shards_are_disjoint_and_cover_the_plan():
    shards = [list(Fixed(list(range(10)), num_replicas=2, rank=r)) for r in (0, 1)]
    assert shards == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]


def test_uneven_plan_is_padded_like_distributed_sampler():
    shards = [list(Fixed([0, 1, 2, 3, 4], num_replicas=2, rank=r)) for r in (0, 1)]
    assert [len(s) for s in shards] == [3, 3]
    assert sorted(shards[0] + shards[1]) == [0, 0, 1, 2, 3, 4]  # one repeat, nothing dropped
    assert len(Fixed([0, 1, 2, 3, 4], num_replicas=2, rank=0)) == 3


def test_subset_size_is_a_multiple_of_the_world_size():
    sampler = RandomSubsetSampler(101, 0.5, num_replicas=4, rank=0)
    assert sampler.subset_size(0.5) == 52 and sampler.subset_size(1.0) == 100 and sampler.subset_size(0.001) == 4


def test_plan_is_deterministic_per_seed_and_epoch():
    a, b = RandomSubsetSampler(50, 0.4, replacement=True, seed=3), RandomSubsetSampler(50, 0.4, replacement=True, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_state_dict_refuses_another_dataset():
    state = RandomSubsetSampler(50).state_dict()
    with pytest.raises(ValueError, match="same dataset and seed"):
        RandomSubsetSampler(60).load_state_dict(state)


def test_empty_plan_is_an_error():
    with pytest.raises(RuntimeError, match="empty epoch"):
        list(Fixed([]))


def test_a_resumed_epoch_keeps_its_saved_plan_and_skips_what_already_trained():
    sampler = Fixed(list(range(10)), num_replicas=2, rank=1)
    saved = EpochPlan(torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0]))  # the plan the epoch had before the checkpoint
    sampler.resume_epoch(0, saved, consumed=2)
    assert len(sampler) == 5  # the whole epoch's length: Lightning counts the trained batches itself
    assert list(sampler) == [4, 2, 0]  # rank 1's shard [8, 6, 4, 2, 0] without its first 2
    assert list(sampler) == [8, 6, 4, 2, 0]  # skipped once only
    sampler.set_epoch(1)
    assert list(sampler) == [1, 3, 5, 7, 9]  # the next epoch is planned as usual
