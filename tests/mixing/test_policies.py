"""The mixing policies' math: the references' updates (benchmarks/mixing_references.py), their guards and state."""

import math

import pytest
import torch

from benchmarks import mixing_references as refs
from weightwise.mixing import ADO, ODM, Aioli, DomainStats, DoReMi, FixedMixture
from weightwise.mixing.policies import check_weights, clip_min_probability, fit_power_laws, power_law, savgol_smooth


def stats(losses, samples, **scores):
    samples = torch.tensor(samples, dtype=torch.float64)
    return DomainStats(
        torch.tensor(losses, dtype=torch.float64),
        samples,
        samples,
        {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()},
    )


@pytest.mark.parametrize("compare", [refs.compare_odm, refs.compare_doremi, refs.compare_ado])
def test_each_update_matches_its_transcribed_reference_to_1e_6(compare):
    assert compare(60, seed=3) < refs.TOLERANCE


@pytest.mark.parametrize("ema", [0.1, None])
def test_aioli_rounds_match_the_transcribed_reference(ema):
    assert refs.compare_aioli(3, seed=1, ema=ema) < refs.TOLERANCE


def test_the_comparisons_see_weights_that_move():
    """A comparison of constant weights would prove nothing: ODM's weights leave uniform once its
    exploration rate sqrt(ln K / (K t)) falls below 1/K (t > K ln K)."""
    odm = ODM(3, warmup_steps=0)
    first = odm.update(10, stats([1.0, 2.0, 3.0], [1, 1, 1])).clone()
    assert (first - 1 / 3).abs().max() > 1e-2
    assert (odm.update(11, stats([1.0, 2.0, 5.0], [1, 1, 1])) - first).abs().max() > 1e-3


def test_odm_by_hand():
    odm = ODM(2, warmup_steps=1, smoothing=0.5)
    assert odm.update(1, stats([1.0, 2.0], [1, 1])).tolist() == [0.5, 0.5]  # warm-up: no update
    w = odm.update(2, stats([1.0, 2.0], [1, 1]))
    eps = min(0.5, math.sqrt(math.log(2) / (2 * 2)))
    r = torch.tensor([0.5 * math.e, 0.5 * math.e**2], dtype=torch.float64)
    expected = (1 - 2 * eps) * r / r.sum() + eps
    torch.testing.assert_close(w, expected / expected.sum(), rtol=1e-12, atol=0)
    # an absent domain keeps its reward
    odm.update(3, stats([float("nan"), 1.0], [0, 4]))
    assert odm.rewards[0] == r[0]


def test_doremi_by_hand_and_its_missing_signal():
    doremi = DoReMi(2, eta=1.0, smoothing=0.1)
    w = doremi.update(1, stats([2.0, 2.0], [1, 1], excess_loss=[1.0, 0.0]))
    soft = torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), 0)
    torch.testing.assert_close(w, 0.9 * soft + 0.05, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="excess_loss"):
        DoReMi(2).update(1, stats([1.0, 1.0], [1, 1]))


def test_aioli_needs_held_out_losses_and_probes_each_domain():
    aioli = Aioli(2, lp_rounds=1, lp_steps=2, round_steps=10)
    with pytest.raises(ValueError, match="evaluate="):
        aioli.start(None)
    calls = []
    evaluate = lambda: calls.append(1) or torch.tensor([2.0, 3.0])  # noqa: E731
    aioli.start(evaluate)
    probed = {int(aioli.weights.argmax())}
    for step in range(1, 5):
        aioli.update(step, stats([1.0, 1.0], [1, 1]), evaluate)
        probed.add(int(aioli.weights.argmax()))
    assert probed == {0, 1} and len(calls) == 3  # start + one per burst


def test_ado_fit_recovers_a_known_law_and_savgol_matches_scipy():
    scipy_signal = pytest.importorskip("scipy.signal")
    n = (torch.arange(1, 201, dtype=torch.float64)[::10] * 64).expand(1, -1)
    truth = torch.tensor([[1.5, 0.9, 0.35]], dtype=torch.float64)
    curve = torch.stack([power_law(truth, v.reshape(1)) for v in n[0]], 1)
    fitted = fit_power_laws(n, curve, iterations=150)
    predicted = torch.stack([power_law(fitted, v.reshape(1)) for v in n[0]], 1)
    assert float(((predicted - curve) / curve).abs().max()) < 0.05
    noisy = torch.randn(2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).cumsum(1)
    expected = torch.tensor(scipy_signal.savgol_filter(noisy.numpy(), 11, 3, axis=-1))
    torch.testing.assert_close(savgol_smooth(noisy, 11, 3), expected, rtol=0, atol=1e-9)


def test_ado_keeps_the_prior_until_its_first_fit_and_floors_every_domain():
    ado = ADO(2, [0.8, 0.2], start_step=5, update_every=5, ignore_steps=0, window=5)
    for step in range(1, 5):
        assert ado.update(step, stats([3.0 / step, 2.0], [3, 1])).tolist() == pytest.approx([0.8, 0.2])
    floored = clip_min_probability(torch.tensor([1.0, 0.0], dtype=torch.float64), 0.01)  # raised to 0.01, renormalised
    torch.testing.assert_close(floored, torch.tensor([1 / 1.01, 0.01 / 1.01], dtype=torch.float64), rtol=1e-12, atol=0)


def test_weights_that_are_not_a_distribution_are_refused():
    with pytest.raises(FloatingPointError, match="not finite"):
        check_weights(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        FixedMixture(2, [-1.0, 2.0])
    assert FixedMixture.uniform(4).weights.tolist() == [0.25] * 4


@pytest.mark.parametrize(
    "make",
    [lambda: ODM(3, warmup_steps=0), lambda: DoReMi(3), lambda: ADO(3, start_step=4, update_every=4, ignore_steps=0, window=5)],
)
def test_state_dicts_resume_the_same_trajectory(make):
    gen = torch.Generator().manual_seed(0)
    sequence = [
        stats((torch.rand(3, generator=gen) + 1).tolist(), [1, 2, 1], excess_loss=torch.rand(3, generator=gen).tolist())
        for _ in range(8)
    ]
    whole, first = make(), make()
    for step, s in enumerate(sequence[:4], start=1):
        whole.update(step, s)
        first.update(step, s)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for step, s in enumerate(sequence[4:], start=5):
        assert torch.equal(whole.update(step, s), resumed.update(step, s))
    with pytest.raises(ValueError, match="same policy"):
        ODM(4).load_state_dict(whole.state_dict())
