"""Coverage-centric coreset selection (Zheng et al., ICLR 2023) against the reference's procedure
(``core/data/Coreset.py``) and in a real Trainer run."""


import pytest
import torch

from tests.support.models import Classifier, blobs, indexed_loader
from tests.support.training import trainer
from weightwise import SampleScoreStore
from weightwise.callbacks import DataPruning
from weightwise.losses import el2n
from weightwise.samplers import CoverageSampler, make_sampler
from weightwise.selection.ccs import allocate_budget, coverage_select, stratify


def reference_strata(score, stratas):
    """``stratified_sampling``'s strata, as the reference computes them (a loop of half-open ranges)."""
    min_score, max_score = torch.min(score), torch.max(score) * 1.0001
    step = (max_score - min_score) / stratas
    return [torch.logical_and(score >= min_score + k * step, score < min_score + (k + 1) * step) for k in range(stratas)]


def reference_budgets(counts, num):
    """``bin_allocate`` of the reference, verbatim in substance."""
    sorted_index = torch.argsort(counts, stable=True)
    sort_bins = counts[sorted_index]
    rest, budgets = num, []
    for i in range(counts.shape[0]):
        avg = rest // (counts.shape[0] - i)
        cur = min(sort_bins[i].item(), avg)
        budgets.append(cur)
        rest -= cur
    out = torch.zeros(counts.shape[0], dtype=torch.long)
    out[sorted_index] = torch.tensor(budgets)
    return out


def test_budget_goes_to_the_smallest_strata_first_by_hand():
    # sorted: 0 (1), 2 (3), 3 (6), 1 (10); 12 // 4 = 3 -> 1; 11 // 3 = 3 -> 3; 8 // 2 = 4 -> 4; 4 // 1 -> 4
    assert allocate_budget(torch.tensor([1, 10, 3, 6]), 12).tolist() == [1, 4, 3, 4]
    assert allocate_budget(torch.tensor([0, 2, 2]), 10).tolist() == [0, 2, 2]  # more budget than samples: all of them
    assert allocate_budget(torch.tensor([5, 5, 5]), 4).tolist() == [1, 1, 2]  # remainders go to the later (larger) strata
    counts = torch.randint(0, 40, (50,), generator=torch.Generator().manual_seed(0))
    for budget in (0, 7, 300, 900, 5000):
        assert torch.equal(allocate_budget(counts, budget), reference_budgets(counts, budget))
    with pytest.raises(ValueError, match="non-negative"):
        allocate_budget(torch.tensor([1, 2]), -1)


def test_strata_are_the_references_equal_width_half_open_ranges():
    score = torch.rand(1000, generator=torch.Generator().manual_seed(1)) ** 3 + 0.01
    strata = stratify(score, 50)
    for k, members in enumerate(reference_strata(score, 50)):
        assert torch.equal(strata == k, members), k
    # Departure: with max <= 0 the reference's top edge (max * 1.0001) falls below the maximum and drops it.
    negative = torch.tensor([-3.0, -2.0, -1.0])
    assert sum(int(m.sum()) for m in reference_strata(negative, 2)) == 2
    assert stratify(negative, 2).tolist() == [0, 1, 1]
    assert stratify(torch.zeros(4), 5).tolist() == [0, 0, 0, 0]  # all equal: one stratum (the reference keeps none)
    with pytest.raises(ValueError, match="finite"):
        stratify(torch.tensor([1.0, float("nan")]))


def test_coverage_selection_cuts_the_hardest_then_matches_the_references_stratum_budgets():
    generator = torch.Generator().manual_seed(2)
    scores = torch.rand(500, generator=generator) ** 2  # EL2N-like: larger = harder
    keep, beta = 100, 0.2
    chosen = coverage_select(scores, keep, skip_hardest=beta, generator=generator)
    hard = scores.argsort(descending=True)[: int(beta * 500)]
    assert chosen.numel() == keep and not set(hard.tolist()) & set(chosen.tolist())
    # the reference: mislabel_mask drops the int(beta N) hardest, stratified_sampling shares int(ratio N) over 50 strata
    easy = scores.argsort(descending=True)[int(beta * 500) :]
    masks = reference_strata(scores[easy], 50)
    budgets = reference_budgets(torch.tensor([int(m.sum()) for m in masks]), keep)
    for members, budget in zip(masks, budgets):
        assert len(set(easy[members].tolist()) & set(chosen.tolist())) == budget
    # margins (AUM): low = hard, cut from the bottom
    low = coverage_select(scores, keep, skip_hardest=beta, hardest="low", generator=generator)
    assert not set(scores.argsort()[: int(beta * 500)].tolist()) & set(low.tolist())
    # coverage: every difficulty is represented, unlike Data Diet's top-k
    width = float(scores[easy].max() - scores[easy].min()) / 50
    assert scores[chosen].min() < scores[easy].min() + width and scores[chosen].max() > scores[easy].max() - width
    with pytest.raises(ValueError, match="keep=401"):
        coverage_select(scores, 401, skip_hardest=0.2)
    with pytest.raises(ValueError, match="hardest"):
        coverage_select(scores, 10, hardest="top")


def store_with(values, name="el2n"):
    store = SampleScoreStore()
    store.record(name, torch.arange(len(values)), torch.as_tensor(values, dtype=torch.float32))
    return store


def test_sampler_keeps_a_share_of_the_full_dataset_and_agrees_across_ranks():
    scores = torch.rand(101, generator=torch.Generator().manual_seed(3))
    plans = []
    for rank in (0, 1):
        sampler = CoverageSampler(101, keep_fraction=0.3, skip_hardest=0.1, warmup_epochs=2, num_replicas=2, rank=rank, strata=10)
        sampler.attach_scores(store_with(scores))
        sampler.set_epoch(1)
        assert len(sampler.plan.indices) == 101  # warm-up: every sample
        sampler.set_epoch(2)
        plans.append(sampler.plan.indices)
    assert torch.equal(plans[0], plans[1]) and len(plans[0]) == 30  # int(0.3 * 101) = 30, a multiple of 2 ranks
    assert not set(scores.argsort(descending=True)[:10].tolist()) & set(plans[0].tolist())  # int(0.1 * 101) cut
    other_seed = CoverageSampler(101, keep_fraction=0.3, skip_hardest=0.1, warmup_epochs=2, strata=10, seed=1)
    other_seed.attach_scores(store_with(scores))
    other_seed.set_epoch(2)
    assert set(other_seed.plan.indices.tolist()) != set(plans[0].tolist())
    with pytest.raises(ValueError, match="exceeds 1"):
        CoverageSampler(100, keep_fraction=0.8, skip_hardest=0.3)
    with pytest.raises(ValueError, match="strata"):
        CoverageSampler(100, strata=0)
    assert isinstance(make_sampler("ccs", 100, keep_fraction=0.1), CoverageSampler)


def test_ccs_in_a_trainer_scores_once_after_warmup_and_trains_on_a_covering_coreset():
    model = Classifier(el2n=True, lr=0.0)  # frozen: the pass' scores can be recomputed
    sampler = CoverageSampler(64, keep_fraction=0.25, skip_hardest=0.1, strata=5, warmup_epochs=1)
    pruning = DataPruning()
    trainer(max_epochs=3, callbacks=[pruning]).fit(model, indexed_loader(64, 8, sampler=sampler))
    assert pruning.ledger["samples_scored"] == 64 and pruning.ledger["samples_visited"] == 64 + 2 * 16
    x, y = blobs(64).tensors
    model.eval()
    scores = el2n(model.net(x), y)
    torch.testing.assert_close(pruning.reducer.scores.signal("el2n"), scores)
    chosen = sampler.plan.indices
    assert len(chosen) == 16 and not set(scores.argsort(descending=True)[:6].tolist()) & set(chosen.tolist())
    kept = scores[chosen]
    assert kept.min() < scores.median() < kept.max()  # not only the hardest (Data Diet would keep the top 16)

