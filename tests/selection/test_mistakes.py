"""Plausible one-line mistakes in data selection that the suite must catch.

Each test names the mistake it guards against (benchmarks/mutations.py plants them one at a time).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from weightwise import SampleScoreStore
from weightwise.callbacks import OnlineBatchSelection
from weightwise.samplers import EpochPlan, EpochSampler, InfoBatchSampler, RandomSubsetSampler
from weightwise.selection.dsir import resample


def infobatch(prune_ratio: float, **kwargs) -> InfoBatchSampler:
    """InfoBatch over 20 samples of losses 0..19 (ids 0..9 below the mean), planning epoch 1."""
    store = SampleScoreStore()
    store.update(torch.arange(20), torch.arange(20.0), step=0)
    sampler = InfoBatchSampler(20, prune_ratio=prune_ratio, num_epochs=10, **kwargs)
    sampler.attach_scores(store)
    sampler.set_epoch(1)
    return sampler


def test_infobatch_keeps_one_minus_the_prune_ratio_of_the_well_learned():
    """Guards against keeping ``prune_ratio`` of the well-learned samples instead of ``1 - prune_ratio``
    (the same at the default 0.5)."""
    sampler = infobatch(0.3)
    visited = sorted(sampler)
    assert len(visited) == 20 - 3  # int(0.7 * 10) = 7 of the 10 well-learned kept
    kept_easy = [i for i in visited if i < 10]
    assert sampler.epoch_weights()[kept_easy].tolist() == pytest.approx([10 / 7] * 7)


def test_infobatch_nominal_rescale_is_one_over_one_minus_r():
    """Guards against a nominal factor of 1/r instead of 1/(1 - r) (the same at r = 0.5)."""
    sampler = infobatch(0.3, rescale="nominal")
    assert float(sampler.epoch_weights()[0]) == pytest.approx(1 / 0.7)


def test_infobatch_prunes_exactly_the_count_it_planned():
    """Guards against pruning one well-learned sample fewer than planned (an off-by-one in the cut)."""
    for ratio in (0.3, 0.5, 0.7):
        kept = int((1.0 - ratio) * 10)  # the reference's int(keep_ratio * n) of the 10 well-learned
        assert len(list(infobatch(ratio))) == 20 - (10 - kept), ratio


def test_rs2_draws_a_fresh_permutation_for_every_pass():
    """Guards against reusing one permutation for every pass over the data (RS2's passes must differ)."""
    sampler = RandomSubsetSampler(12, fraction=0.5)  # 2 epochs per pass

    def epochs(first: int) -> list[int]:
        seen = []
        for epoch in (first, first + 1):
            sampler.set_epoch(epoch)
            seen += list(sampler)
        return seen

    passes = [epochs(0), epochs(2), epochs(4)]
    assert all(sorted(p) == list(range(12)) for p in passes)
    assert passes[0] != passes[1] and passes[1] != passes[2]


class Fixed(EpochSampler):
    def __init__(self, n: int, **kwargs) -> None:
        super().__init__(n, **kwargs)

    def plan_epoch(self, epoch, generator):
        return EpochPlan(torch.arange(self.num_samples))


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_uneven_plans_are_padded_to_equal_shards_on_any_world_size(replicas):
    """Guards against padding a plan with ``remainder`` samples instead of ``replicas - remainder``
    (the same on 2 ranks): every rank must run the same number of steps."""
    shards = [list(Fixed(10, num_replicas=replicas, rank=r)) for r in range(replicas)]
    length = math.ceil(10 / replicas)
    assert [len(s) for s in shards] == [length] * replicas
    assert sorted(set(i for s in shards for i in s)) == list(range(10))


def test_gumbel_top_k_draws_in_proportion_to_the_weights():
    """Guards against a Gumbel-top-k with the noise's sign flipped: a reflected Gumbel does not choose
    in proportion to the weights once there are more than two documents (with two, the difference of
    the noises is logistic either way, so the test uses five: the flipped sign picks the heavy one 62%)."""
    log_weights = torch.log(torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0]))
    first = torch.tensor([int(resample(log_weights, 1, seed=seed)[0]) for seed in range(4000)])
    assert float((first == 4).float().mean()) == pytest.approx(4 / 8, abs=0.04)  # 5 standard deviations


@pytest.mark.parametrize("top_k", [False, True])
def test_ineligible_documents_are_never_chosen_however_heavy(top_k):
    """Guards against masking ineligible documents with key 0 instead of -inf (log weights are often
    far below 0, so a 0 key is chosen first)."""
    chosen = resample(
        torch.tensor([-40.0, -50.0, 3.0, 5.0, -45.0]),
        3,
        seed=1,
        top_k=top_k,
        eligible=torch.tensor([True, True, False, False, True]),
    )
    assert sorted(chosen.tolist()) == [0, 1, 4]


@pytest.mark.parametrize("start, end", [(2, 4), (0.2, 0.4)])
def test_online_selection_is_active_from_its_start_step_up_to_but_not_at_its_end(start, end):
    """Guards against an online-selection window that includes its end step (``<`` becomes ``<=``);
    interrupt=0 so that no whole-batch step hides it."""
    selection = OnlineBatchSelection(keep=0.5, start=start, end=end, interrupt=0)
    active = [
        selection.active(SimpleNamespace(global_step=step, estimated_stepping_batches=10), batch_idx=step) for step in range(6)
    ]
    assert active == [False, False, True, True, False, False]
