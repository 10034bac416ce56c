import math
import warnings

import pytest
import torch

from weightwise import SampleScoreStore
from weightwise.samplers import (
    ImportanceSampler,
    InfoBatchSampler,
    RandomSubsetSampler,
    ScorePruningSampler,
)


def store_with(values, name="loss"):
    store = SampleScoreStore()
    ids = torch.arange(len(values))
    store.update(ids, torch.as_tensor(values, dtype=torch.float32), step=0)
    if name not in ("loss", "ema"):
        store.record(name, ids, torch.as_tensor(values, dtype=torch.float32))
    return store


# ---------------------------------------------------------------- InfoBatch
def test_infobatch_first_epoch_is_full_without_scores():
    sampler = InfoBatchSampler(20, prune_ratio=0.5, num_epochs=10)
    assert sorted(sampler) == list(range(20)) and sampler.epoch_weights() is None


def test_infobatch_prunes_half_of_the_below_mean_samples_and_rescales_the_rest():
    losses = torch.arange(20, dtype=torch.float32)  # mean 9.5: ids 0..9 are well learned
    sampler = InfoBatchSampler(20, prune_ratio=0.5, num_epochs=10)
    sampler.attach_scores(store_with(losses))
    sampler.set_epoch(1)
    visited = set(sampler)
    assert len(visited) == 15 and set(range(10, 20)) <= visited  # 5 of 10 well-learned pruned, hard ones kept
    weights = sampler.epoch_weights()
    kept_easy = [i for i in visited if i < 10]
    assert torch.equal(weights[kept_easy], torch.full((5,), 2.0))  # 1 / (1 - 0.5)
    assert torch.equal(weights[10:], torch.ones(10))
    # Unbiased: the expected weighted sum over the epoch equals the full-data sum.
    expected = sum(losses[i] * weights[i] for i in visited)
    assert abs(float(expected) - float(losses.sum())) < 20  # one draw; exact in expectation (next test)


def test_infobatch_is_unbiased_in_expectation():
    losses = torch.rand(40) * 3
    sampler = InfoBatchSampler(40, prune_ratio=0.7, num_epochs=100)
    sampler.attach_scores(store_with(losses))
    total = torch.zeros(())
    draws = 2000
    for epoch in range(draws):
        sampler.set_epoch(epoch % 80)  # below the annealing epoch
        sampler.seed = epoch  # fresh randomness per draw
        sampler.refresh()
        plan = sampler.plan
        total += (losses[plan.indices] * plan.weights[plan.indices]).sum()
    assert abs(float(total / draws) - float(losses.sum())) / float(losses.sum()) < 0.01


def test_infobatch_anneals_to_full_data():
    sampler = InfoBatchSampler(20, prune_ratio=0.5, num_epochs=8, anneal=0.875)
    sampler.attach_scores(store_with(torch.arange(20.0)))
    sampler.set_epoch(6)
    assert len(list(sampler)) == 15
    sampler.set_epoch(7)  # 7 >= 0.875 * 8
    assert sorted(sampler) == list(range(20)) and sampler.epoch_weights() is None


def test_infobatch_annealing_epoch_is_the_references_when_epochs_times_delta_is_not_whole():
    sampler = InfoBatchSampler(20, prune_ratio=0.5, num_epochs=10, anneal=0.875)  # stop_prune = 8.75
    sampler.attach_scores(store_with(torch.arange(20.0)))
    assert [sampler.prunes(e) for e in range(10)] == [True] * 8 + [False] * 2  # epoch e prunes while e + 1 <= 8.75
    sampler.set_epoch(8)
    assert sorted(sampler) == list(range(20)) and sampler.epoch_weights() is None


def test_infobatch_equal_scores_have_nothing_below_the_mean_to_prune():
    sampler = InfoBatchSampler(20, prune_ratio=0.5, num_epochs=10)
    sampler.attach_scores(store_with(torch.full((20,), 1.5)))  # strict <: no sample is below the mean
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(20)) and torch.equal(sampler.epoch_weights(), torch.ones(20))


def test_infobatch_keeps_the_floor_of_the_well_learned_share_and_rescales_nominally_on_request():
    losses = torch.arange(22, dtype=torch.float32)  # mean 10.5: 11 well learned
    realised = InfoBatchSampler(22, prune_ratio=0.5, num_epochs=10)
    nominal = InfoBatchSampler(22, prune_ratio=0.5, num_epochs=10, rescale="nominal")
    for sampler in (realised, nominal):
        sampler.attach_scores(store_with(losses))
        sampler.set_epoch(1)
    assert len(list(realised)) == 22 - (11 - 5)  # int(0.5 * 11) = 5 kept, as the reference's int(keep_ratio * n)
    assert float(realised.epoch_weights()[0]) == pytest.approx(11 / 5) and float(nominal.epoch_weights()[0]) == 2.0


def test_infobatch_at_the_largest_prune_ratio_keeps_what_the_reference_keeps():
    # The reference's keep_ratio = max(0.1, 1 - 0.9) = 0.1 keeps int(0.1 * 10) = 1 of the 10 well-learned;
    # int((1 - 0.9) * 10) would be int(0.999...) = 0.
    sampler = InfoBatchSampler(20, prune_ratio=0.9, num_epochs=10)
    sampler.attach_scores(store_with(torch.arange(20, dtype=torch.float32)))
    sampler.set_epoch(1)
    visited = sorted(sampler)
    assert visited[1:] == list(range(10, 20)) and visited[0] < 10  # the 10 above the mean and 1 of the others
    assert float(sampler.epoch_weights()[visited[0]]) == pytest.approx(10.0)  # the 9 pruned are carried by it
    nominal = InfoBatchSampler(20, prune_ratio=0.9, num_epochs=10, rescale="nominal")
    nominal.attach_scores(store_with(torch.arange(20, dtype=torch.float32)))
    nominal.set_epoch(1)
    assert float(nominal.epoch_weights()[sorted(nominal)[0]]) == pytest.approx(10.0)  # the reference's 1 / keep_ratio


def test_infobatch_may_prune_every_well_learned_sample_without_dividing_by_zero():
    sampler = InfoBatchSampler(12, prune_ratio=0.9, num_epochs=10)  # int(0.1 * 2) = 0 of the 2 well-learned kept
    sampler.attach_scores(store_with(torch.tensor([0.0, 1.0] + [10.0] * 10)))
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(2, 12))
    assert torch.equal(sampler.epoch_weights()[2:], torch.ones(10))


def test_infobatch_keeps_unscored_samples_and_rounds_to_world_size():
    store = SampleScoreStore()
    store.update(torch.arange(10), torch.arange(10.0), step=0)  # ids 10..20 never seen
    sampler = InfoBatchSampler(21, prune_ratio=0.5, num_epochs=10, num_replicas=2, rank=0)
    sampler.attach_scores(store)
    sampler.set_epoch(1)
    plan = sampler.plan
    assert plan.indices.numel() % 2 == 0
    assert set(range(10, 21)) <= set(plan.indices.tolist())
    pruned = 21 - plan.indices.numel()
    assert torch.allclose(plan.weights[plan.indices[plan.indices < 5]], torch.tensor(5 / (5 - pruned)))


def test_infobatch_needs_num_epochs_once_scored():
    sampler = InfoBatchSampler(10)
    sampler.attach_scores(store_with(torch.arange(10.0)))
    sampler.set_epoch(1)
    with pytest.raises(ValueError, match="num_epochs"):
        list(sampler)


# ---------------------------------------------------------------- RS2
def test_rs2_without_replacement_sees_everything_before_repeating():
    sampler = RandomSubsetSampler(30, fraction=0.2)  # 6 per epoch, 5 epochs per pass
    first_pass = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        first_pass += list(sampler)
    assert sorted(first_pass) == list(range(30))
    sampler.set_epoch(5)
    assert len(set(sampler)) == 6


def test_rs2_subset_that_straddles_two_passes():
    sampler = RandomSubsetSampler(10, fraction=0.4)  # 4 per epoch: epoch 2 takes 2 + 2 across passes
    seen = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        seen += list(sampler)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_rs2_with_replacement_draws_independent_subsets():
    sampler = RandomSubsetSampler(100, fraction=0.3, replacement=True)
    subsets = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        subsets.append(set(sampler))
    assert all(len(s) == 30 for s in subsets) and subsets[0] != subsets[1]


# ---------------------------------------------------------------- importance sampling
def test_importance_probabilities_follow_scores_with_a_floor():
    sampler = ImportanceSampler(4, score="ema", uniform_mix=0.2)
    sampler.attach_scores(store_with([0.0, 1.0, 1.0, 2.0]))
    p = sampler.probabilities()
    assert torch.allclose(p, 0.8 * torch.tensor([0.0, 0.25, 0.25, 0.5]) + 0.05)
    assert p.min() == 0.05  # floor: eps / N


def test_importance_weights_make_the_loss_estimate_unbiased():
    losses = torch.rand(50) * 4
    sampler = ImportanceSampler(50, fraction=1.0, score="ema", uniform_mix=0.1)
    sampler.attach_scores(store_with(losses))
    estimates = []
    for epoch in range(300):
        sampler.set_epoch(epoch)
        plan = sampler.plan
        estimates.append((losses[plan.indices] * plan.weights[plan.indices]).mean())
    assert abs(float(torch.stack(estimates).mean()) - float(losses.mean())) / float(losses.mean()) < 0.02
    # and high-loss samples are drawn more often
    counts = torch.bincount(sampler.plan.indices, minlength=50)
    assert counts[losses.argsort()[-10:]].sum() > counts[losses.argsort()[:10]].sum()


def test_importance_first_epoch_is_uniform_and_unscored_samples_are_optimistic():
    sampler = ImportanceSampler(10, fraction=0.5)
    assert len(set(sampler)) == 5 and sampler.epoch_weights() is None
    store = SampleScoreStore()
    store.update(torch.arange(5), torch.ones(5), step=0)
    store.update(torch.tensor([5]), torch.tensor([3.0]), step=0)  # ids 6..9 unseen: get the max, 3
    sampler.attach_scores(store)
    p = sampler.probabilities()
    assert torch.allclose(p[6:], p[5].expand(4))


def test_importance_rejects_negative_scores():
    sampler = ImportanceSampler(3, score="margin")
    sampler.attach_scores(store_with([1.0, -1.0, 0.5], name="margin"))
    with pytest.raises(ValueError, match="non-negative"):
        sampler.probabilities()


# ---------------------------------------------------------------- Data Diet
def test_score_pruning_static_keeps_the_highest_scores_after_warmup():
    sampler = ScorePruningSampler(10, keep_fraction=0.3, score="el2n", warmup_epochs=2)
    sampler.attach_scores(store_with(torch.arange(10.0), name="el2n"))
    sampler.set_epoch(1)
    assert len(list(sampler)) == 10
    sampler.set_epoch(2)
    assert sorted(sampler) == [7, 8, 9]
    sampler.set_epoch(9)
    assert sorted(sampler) == [7, 8, 9]  # static: never rescored


def test_score_pruning_skip_hardest_offset():
    sampler = ScorePruningSampler(10, keep_fraction=0.3, score="el2n", skip_hardest=0.2)
    sampler.attach_scores(store_with(torch.arange(10.0), name="el2n"))
    sampler.set_epoch(1)
    assert sorted(sampler) == [5, 6, 7]


def test_score_pruning_rescoring_is_a_pass_not_an_epoch_and_reselects():
    store = store_with(torch.arange(10.0), name="el2n")
    sampler = ScorePruningSampler(10, keep_fraction=0.2, score="el2n", warmup_epochs=1, rescore_every=3)
    sampler.attach_scores(store)
    assert [e for e in range(10) if sampler.is_full_epoch(e)] == [0]
    assert [e for e in range(10) if sampler.needs_scoring(e)] == [1, 4, 7]  # NLU on Data Diets' cycles
    sampler.set_epoch(1)
    assert sorted(sampler) == [8, 9]
    sampler.record_scores(torch.arange(10), {"el2n": torch.arange(10.0).flip(0)})  # the pass before epoch 4
    sampler.set_epoch(3)
    sampler.refresh()
    assert sorted(sampler) == [8, 9]  # the selection made after the pass of epoch 1
    sampler.set_epoch(4)
    assert sorted(sampler) == [0, 1]


def test_score_pruning_from_training_steps_has_full_rescoring_epochs():
    store = store_with(torch.arange(10.0), name="el2n")
    sampler = ScorePruningSampler(10, keep_fraction=0.2, score="el2n", warmup_epochs=1, rescore_every=3, scoring="training")
    sampler.attach_scores(store)
    assert [e for e in range(10) if sampler.is_full_epoch(e)] == [0, 4, 7]
    assert not any(sampler.needs_scoring(e) for e in range(10))
    sampler.set_epoch(1)
    assert sorted(sampler) == [8, 9]
    store.record("el2n", torch.arange(10), torch.arange(10.0).flip(0))  # the rescoring epoch changes the ranking
    sampler.set_epoch(3)
    assert sorted(sampler) == [8, 9]  # same selection until the next full pass
    sampler.set_epoch(5)
    assert sorted(sampler) == [0, 1]


def nlu_ema(passes, alpha, c):
    """NLU on Data Diets' fetch_ema by hand: pandas' ewm(alpha, adjust=False) mean + c * std, from its
    weights w_0 = (1 - a)^t, w_i = a (1 - a)^(t - i) and its bias correction 1 / (1 - sum w^2)."""
    t = len(passes) - 1
    w = [(1 - alpha) ** t] + [alpha * (1 - alpha) ** (t - i) for i in range(1, t + 1)]
    mean = sum(wi * x for wi, x in zip(w, passes))
    if t == 0 or c == 0:
        return mean
    var = sum(wi * (x - mean) ** 2 for wi, x in zip(w, passes)) / (1 - sum(wi**2 for wi in w))
    return mean + c * math.sqrt(var)


@pytest.mark.parametrize(
    "mode, std_coef, expected",
    [
        ("latest", 1.0, [5.0, 1.0]),
        # NLU's EMA with its CLI's c = 1 (the default); id 1 is first seen in pass 3: its mean alone
        ("ema", 1.0, [nlu_ema([1.0, 3.0, 5.0], 0.8, 1.0), 1.0]),
        ("ema", 0.0, [0.8 * 5.0 + 0.2 * (0.8 * 3.0 + 0.2 * 1.0), 1.0]),  # s <- 0.8 x + 0.2 s, the mean alone
        ("last_k", 1.0, [(1.0 + 3.0 + 5.0) / 3, 1.0]),
    ],
)
def test_passes_combine_as_nlu_on_data_diets(mode, std_coef, expected):
    from weightwise.selection.scoring import ScoreAverager

    store, averager = SampleScoreStore(), ScoreAverager(mode, alpha=0.8, k=3, std_coef=std_coef)
    averager.record(store, torch.tensor([0]), {"el2n": torch.tensor([1.0])})
    averager.record(store, torch.tensor([0]), {"el2n": torch.tensor([3.0])})
    store.record("el2n", torch.tensor([0]), torch.tensor([100.0]))  # a training step in between does not leak in
    averager.record(store, torch.tensor([0, 1]), {"el2n": torch.tensor([5.0, 1.0])})
    torch.testing.assert_close(store.signal("el2n"), torch.tensor(expected))
    restored = ScoreAverager(mode, alpha=0.8, k=3, std_coef=std_coef)
    restored.load_state_dict(averager.state_dict())
    assert restored.passes == 3


def test_the_nlu_ema_is_the_default_and_resumes():
    """ScorePruningSampler(averaging="ema") adds the weighted std (c = 1.0) by default; four passes of
    scores that move by different amounts, against the hand computation; a resumed averager
    continues exactly; a 0.2 checkpoint (mean only) is refused unless the run asks for the mean alone."""
    from weightwise.selection.scoring import ScoreAverager

    sampler = ScorePruningSampler(3, averaging="ema", warmup_epochs=0)
    sampler.attach_scores(SampleScoreStore())
    passes = torch.tensor([[0.5, 2.0, 1.0], [0.7, 0.1, 1.0], [0.6, 1.9, 1.0], [0.9, 0.3, 1.0]])
    resumed = None
    for i, row in enumerate(passes):
        sampler.record_scores(torch.arange(3), {"el2n": row})
        if i == 1:
            resumed = ScorePruningSampler(3, averaging="ema", warmup_epochs=0)
            resumed.attach_scores(SampleScoreStore())
            resumed.load_state_dict(sampler.state_dict())
        elif i > 1:
            resumed.record_scores(torch.arange(3), {"el2n": row})
    expected = torch.tensor([nlu_ema(passes[:, j].tolist(), 0.8, 1.0) for j in range(3)])
    torch.testing.assert_close(sampler.scores.signal("el2n"), expected, rtol=1e-6, atol=0)
    # the reference's own computation, pandas' ewm(alpha=0.8, adjust=False) mean + std (pandas 3.1.1, run
    # once elsewhere; float32 here, so rtol 1e-6)
    pandas_values = torch.tensor([1.0447100083478982, 1.609262766677008, 1.0])
    torch.testing.assert_close(sampler.scores.signal("el2n"), pandas_values, rtol=1e-6, atol=0)
    assert torch.equal(resumed.scores.signal("el2n"), sampler.scores.signal("el2n"))
    assert sampler.scores.signal("el2n")[2] == 1.0  # a score that never moves has no deviation
    old = {"mode": "ema", "passes": 1, "history": {"el2n": torch.tensor([[1.0, 2.0]])}, "version": 1}
    with pytest.raises(ValueError, match="ema_std_coef=0.0"):
        ScoreAverager("ema").load_state_dict(old)
    mean_only = ScoreAverager("ema", std_coef=0.0)
    mean_only.load_state_dict(old)
    store = SampleScoreStore()
    mean_only.record(store, torch.tensor([0]), {"el2n": torch.tensor([3.0])})
    assert store.signal("el2n")[0] == pytest.approx(0.8 * 3.0 + 0.2 * 1.0)


def test_score_pruning_selection_survives_state_dict():
    sampler = ScorePruningSampler(10, keep_fraction=0.2, score="el2n")
    sampler.attach_scores(store_with(torch.arange(10.0), name="el2n"))
    sampler.set_epoch(1)
    list(sampler)
    restored = ScorePruningSampler(10, keep_fraction=0.2, score="el2n")
    restored.load_state_dict(sampler.state_dict())
    restored.attach_scores(store_with(torch.zeros(10), name="el2n"))  # scores changed since
    restored.set_epoch(2)
    assert sorted(restored) == [8, 9]


@pytest.mark.parametrize(
    "factory",
    [
        lambda: InfoBatchSampler(10, prune_ratio=1.0),
        lambda: InfoBatchSampler(10, prune_ratio=0.95),
        lambda: InfoBatchSampler(10, rescale="exact"),
        lambda: RandomSubsetSampler(10, fraction=0.0),
        lambda: ImportanceSampler(10, uniform_mix=0.0),
        lambda: ScorePruningSampler(10, warmup_epochs=0, scoring="training"),
        lambda: ScorePruningSampler(10, rescore_every=1, scoring="training"),
        lambda: ScorePruningSampler(10, rescore_every=0),
        lambda: ScorePruningSampler(10, scoring="epochs"),
        lambda: ScorePruningSampler(10, averaging="median"),
    ],
)
def test_bad_arguments(factory):
    with pytest.raises(ValueError):
        factory()


def test_make_sampler_by_policy_name():
    from weightwise.samplers import make_sampler

    sampler = make_sampler("el2n", 10, keep_fraction=0.3)
    assert isinstance(sampler, ScorePruningSampler) and sampler.score == "el2n" and sampler.keep_fraction == 0.3
    assert isinstance(make_sampler("infobatch", 10), InfoBatchSampler)
    with pytest.raises(ValueError, match="choose one of"):
        make_sampler("forgetting", 10)


def test_the_rising_error_warning_survives_a_resume_and_ignores_falling_errors():
    def sampler_with_store():
        sampler = ScorePruningSampler(10, 0.5, warmup_epochs=0, rescore_every=1)
        sampler.attach_scores(SampleScoreStore())
        return sampler

    first = sampler_with_store()
    first.record_scores(torch.arange(10), {"el2n": torch.tensor([1.2] * 1 + [0.3] * 9)})  # 10% misclassified
    resumed = sampler_with_store()
    resumed.load_state_dict(first.state_dict())
    with pytest.warns(UserWarning, match=r"misclassifies 40% .* up from 10%"):
        resumed.record_scores(torch.arange(10), {"el2n": torch.tensor([1.2] * 4 + [0.3] * 6)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.record_scores(torch.arange(10), {"el2n": torch.tensor([1.2] * 2 + [0.3] * 8)})  # falling: silent
        resumed.record_scores(torch.arange(10), {"el2n": torch.tensor([1.2] * 2 + [0.3] * 8)})  # flat: silent
