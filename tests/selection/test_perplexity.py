"""Perplexity pruning with a reference model (Ankner et al., 2024): the perplexity against hand
computation and transformers' own loss, the bands, and a real Trainer run with one scoring pass."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from tests.support.contracts import easy_and_random, reference_lm
from tests.support.models import TokenLossLM
from tests.support.training import flat_params, trainer
from weightwise import IndexedDataset, SampleScoreStore
from weightwise.callbacks import DataPruning
from weightwise.samplers import PerplexityBandSampler, make_sampler, reference_perplexity, sequence_perplexity


def test_perplexity_by_hand_with_padding_and_ignored_labels():
    probs = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    logits = probs.log().expand(4, 3, 4).clone()  # log-probabilities are their own log-softmax
    ids = torch.tensor([[0, 1, 2]] * 4)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    labels = ids.clone()
    labels[3, 2] = -100
    got = sequence_perplexity(logits, labels, mask)
    # position t predicts token t + 1: p(1 | .) = 0.5, p(2 | .) = 0.25
    assert got[0] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.25)) / 2))
    assert got[1] == pytest.approx(2.0) and got[3] == pytest.approx(2.0)  # the padded / ignored target is not counted
    assert math.isnan(got[2])  # no target token: undefined
    with pytest.raises(ValueError, match="attention_mask"):
        sequence_perplexity(logits, labels, mask[:, :2])


def test_reference_perplexity_is_exp_of_the_references_own_loss_in_eval_mode():
    reference = reference_lm()
    reference.config.attention_dropout = 0.5  # train mode would show in the scores
    for layer in reference.model.layers:
        layer.self_attn.attention_dropout = 0.5
    reference.train()
    ids = torch.stack([item["input_ids"] for item in easy_and_random(6, 12, 64)])
    score = reference_perplexity(reference, micro_batch_size=4)
    first, second = score(None, {"input_ids": ids})["perplexity"], score(None, {"input_ids": ids})["perplexity"]
    assert not reference.training and torch.equal(first, second)
    with torch.no_grad():
        expected = torch.stack([reference(input_ids=row[None], labels=row[None]).loss.exp() for row in ids])
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="inputs="):
        score(None, (ids, ids))
    with pytest.raises(ValueError, match="micro_batch_size"):
        reference_perplexity(reference, micro_batch_size=0)


def selected(band, fraction, values, **kwargs):
    sampler = PerplexityBandSampler(len(values), fraction, band=band, **kwargs)
    sampler.attach_scores(SampleScoreStore())
    sampler.record_scores(torch.arange(len(values)), {"perplexity": torch.tensor(values, dtype=torch.float32)})
    return sorted(sampler)


def test_bands_are_quantile_ranges_of_the_measured_samples():
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 10.0, 4.0, 8.0, 6.0]  # id of perplexity k: [1, 5, 3, 7, 0, 9, 4, 8, 2, 6][k - 1]
    assert selected("low", 0.3, values) == [1, 3, 5]  # perplexities 1, 2, 3
    assert selected("medium", 0.4, values) == [0, 4, 7, 9]  # 4, 5, 6, 7: quantiles [0.3, 0.7]
    assert selected("high", 0.3, values) == [2, 6, 8]  # 8, 9, 10
    assert selected("high", 0.2, values[:8] + [float("nan")] * 2) == [2, 6]  # unmeasured samples never kept
    with pytest.raises(ValueError, match="only 2 of 10"):
        selected("high", 0.5, [1.0, 2.0] + [float("nan")] * 8)
    with pytest.raises(ValueError, match="band"):
        PerplexityBandSampler(10, band="top")
    sampler = PerplexityBandSampler(10)
    sampler.attach_scores(SampleScoreStore())
    with pytest.raises(ValueError, match="reference_perplexity"):
        sampler.record_scores(torch.arange(10), {"eval_loss": torch.ones(10)})
    assert make_sampler("perplexity", 10, band="low").band == "low"


def test_one_scoring_pass_with_the_reference_model_then_the_band_every_epoch():
    n = 24
    reference = reference_lm()
    before = flat_params(reference).clone()
    sampler = PerplexityBandSampler(n, 0.5, band="high")
    pruning = DataPruning(score_fn=reference_perplexity(reference))
    module = TokenLossLM("tokens", layers=2)
    start = flat_params(module).clone()
    loader = DataLoader(IndexedDataset(easy_and_random(n, 12, 64)), batch_size=4, sampler=sampler)
    trainer(max_epochs=3, callbacks=[pruning]).fit(module, loader)

    assert pruning.ledger["samples_scored"] == n  # once, before epoch 0; never again
    assert pruning.ledger["samples_visited"] == 3 * 12
    ids = torch.stack([item["input_ids"] for item in easy_and_random(n, 12, 64)])
    expected = reference_perplexity(reference)(None, {"input_ids": ids})["perplexity"]
    store = pruning.reducer.scores.signal("perplexity")
    torch.testing.assert_close(store, expected, rtol=1e-5, atol=0)
    assert sorted(sampler.plan.indices.tolist()) == sorted(torch.argsort(expected, descending=True)[:12].tolist())
    assert torch.equal(flat_params(reference), before)  # the reference is not trained
    assert not torch.equal(flat_params(module), start)

