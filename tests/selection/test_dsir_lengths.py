"""DSIR's length filter at its boundary: a document of exactly ``min_length`` tokens is eligible
(the reference keeps ``len >= min_example_length``). Guards against ``>`` for ``>=``."""

import torch

from weightwise.samplers import DSIRSampler

LENGTHS = [100, 99, 150, 150, 150, 100]
LOG_WEIGHTS = torch.tensor([5.0, 9.0, 1.0, 2.0, 3.0, 4.0])  # the boundary documents (0, 5) and the too-short one (1) weigh most


def test_resampling_draws_documents_of_exactly_min_length():
    sampler = DSIRSampler(LOG_WEIGHTS, 0.5, lengths=LENGTHS, min_length=100, top_k=True, num_replicas=1, rank=0)
    assert sampler.eligible.tolist() == [True, False, True, True, True, True]
    assert sorted(sampler.selection().tolist()) == [0, 4, 5]  # the 3 heaviest eligible; the 99-token one never


def test_weighting_trains_on_documents_of_exactly_min_length():
    sampler = DSIRSampler(LOG_WEIGHTS, mode="weight", lengths=LENGTHS, min_length=100, num_replicas=1, rank=0)
    sampler.set_epoch(0)
    assert sorted(sampler) == [0, 2, 3, 4, 5]


def test_texts_of_exactly_min_length_tokens_are_eligible():
    words = "shares rose on strong quarterly profits and the market".split()
    texts = [" ".join(words[i % len(words)] for i in range(n)) for n in (7, 8, 9, 8)]
    sampler = DSIRSampler.from_texts(texts, ["profits rose"], fraction=0.5, min_length=8, top_k=True, num_replicas=1, rank=0)
    assert sampler.lengths.tolist() == [7, 8, 9, 8]
    assert sampler.eligible.tolist() == [False, True, True, True]
