"""DSIR: data selection by importance resampling on hashed n-grams (Xie et al., 2023).

"Data Selection for Language Models via Importance Resampling", S. M. Xie, S. Santurkar, T. Ma,
P. Liang (NeurIPS 2023). Given a small *target* set of texts (the kind of data wanted) and a
large *raw* pool, DSIR fits a bag-of-hashed-n-grams distribution to each, weighs every raw
document by the likelihood ratio of the two, and resamples the pool by those weights. The
authors' code is ``p-lambda/dsir`` (PyPI ``data-selection`` 1.0.3:
``data_selection/hashed_ngram_dsir.py`` for the features and the estimator,
``data_selection/base.py`` for the resampling); this module follows it step by step:

1. **Features** (:class:`NgramHasher`): the text is lowercased and split into word-punct tokens,
   ``re.findall(r"\\w+|[^\\w\\s]+")`` (nltk's ``WordPunctTokenizer``: runs of word characters and
   runs of punctuation); every unigram and bigram (``ngrams=2``; the n-gram of tokens
   ``a b`` is the string ``"a b"``) is hashed into one of ``num_buckets=10000`` buckets and
   counted. Documents are featurised in vectorised batches, not one string at a time.
2. **Estimator** (:class:`NgramImportance`): the raw and target bucket distributions are the
   normalised total counts (the target's plus a Laplace pseudo-count ``target_smoothing``,
   default 0); ``log_diff = log(p_target + 1e-8) - log(p_raw + 1e-8)``; a document's log
   importance weight is ``log_diff . counts(document)``.
3. **Resampling** (:func:`resample`): k documents without replacement with probability
   proportional to ``exp(log weight)``, by Gumbel-top-k, or the k largest weights (``top_k``).
   Documents shorter than ``min_length`` tokens (the reference's ``min_example_length=100``) are
   not eligible.

Departures from the reference, each a named option or a documented choice:

* **The hash** (``ngram_hash="sha256"``, the default, is the reference's): every n-gram string is
  hashed with ``int(sha256(s).hexdigest(), 16) % num_buckets``, a Python sha256 call per distinct
  n-gram (cached) - the reference's buckets and log weights (to float rounding), so the defaults
  select what the reference selects (given the same Gumbel noise). ``ngram_hash="fold"`` is the
  named fast option, 2-3x faster: tokens are found and hashed in numpy over a whole batch's
  characters - a polynomial hash of each token's code points, mixed by MurmurHash3's ``fmix64``,
  and n-grams by folding their tokens' keys (exact formulas in :class:`NgramHasher`) - so no
  Python step runs per token. It is a fixed function of the text - no process salt, no vocabulary
  order - so every rank and process computes the same buckets; but every n-gram's bucket differs
  from the reference's (one uniform hash for another), so weights and selections agree with the
  reference statistically, not document for document (``benchmarks/dsir.py`` measures how closely:
  a top-k Jaccard of 0.553 with the reference's selection on its benchmark pool, against 1.0 for
  ``"sha256"``). Use it when featurising dominates (10^7+ documents) and a statistically
  equivalent selection will do.
* **Tokens** are Python ``re``'s ``\\w``/``\\s`` classes. nltk 3.10 (which pip installs with
  ``data-selection`` 1.0.3) compiles the pattern with the third-party ``regex`` engine, whose
  ``\\w`` also covers combining marks and excludes some numerals (``²``, ``½``); the two agree on
  text without such characters (on all 2,225 BBC News articles, token for token).
* **Lengths** are counted as tokens of the document. The reference derives the same number from
  its n-gram counts (``(sum(counts) + n(n-1)/2) // n``), which equals the token count for every
  document of at least ``ngrams - 1`` tokens.
* **The raw-fit budget** (``max_raw_ngrams``, the reference's ``num_tokens_to_fit``, both
  ``100_000 * num_buckets`` by default): the reference splits the raw files into ``num_proc``
  virtual shards and counts each shard until it passes ``budget // shards``, so a capped fit samples
  the start of every shard; here the documents are counted in order until the total passes the
  budget, i.e. the start of the corpus. The two agree whenever the budget is not reached (10^9
  n-grams at 10,000 buckets: every corpus below ~5 * 10^8 tokens); above it, shuffle the raw
  texts, or pass ``max_raw_ngrams="all"``, if the corpus' start is not representative.
* **Randomness**: the Gumbel noise comes from a ``torch.Generator`` seeded by the caller (the
  reference draws from numpy's unseeded global generator), so the same seed gives the same
  selection on every rank and in every run.

Length filter inside a sampler: :class:`DSIRSampler` keeps the reference's ``min_length=100``
tokens by default, so that the defaults reproduce the reference's selection. The filter also
counters a bias of the weights: a document pays ~``log(1e-8)`` for every n-gram the target never
shows, so without it the top weights go to short documents (in ``tests/selection/test_dsir.py``'s
pool the top 10% averaged ~37 tokens against a pool mean of ~123). When the samples are short by
construction (sentences, fixed windows), the filter excludes most of them: the sampler then stops
with an error that names ``min_length=0`` as the fix rather than train on a silently emptied set.

Beyond the paper, :class:`DSIRSampler` offers the weights as loss factors (``mode="weight"``):
every eligible sample is trained on, its loss multiplied by its self-normalised importance
weight (mean 1, optionally capped), so the training objective estimates the target's.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from weightwise.selection.base import EpochPlan, EpochSampler, check_fraction

NgramHash = Literal["fold", "sha256"]
DSIRMode = Literal["resample", "weight"]

TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]+")
"""nltk's ``WordPunctTokenizer`` pattern, which the reference tokenises with."""

LOG_EPSILON = 1e-8
"""Added to both probabilities before the log (as in the reference): empty buckets stay finite."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FMIX = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB93FE5A5DB53))
_SHIFT = np.uint64(33)
_PRIME = np.uint64(0x100000001B3)  # FNV-64's prime; odd, so invertible mod 2^64
_INVERSE_PRIME = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_CACHE_LIMIT = 1 << 21  # distinct n-grams in the sha256 cache before it starts afresh
_SELECTION_SEED_OFFSET = 1 << 32  # DSIRSampler's selection seed, apart from the epochs' seed + epoch


def tokenize(text: str) -> list[str]:
    """The reference's tokens of ``text``: lowercased word-punct tokens.

    Example:
        >>> tokenize("Profits rose 2%, to $11.1bn.")
        ['profits', 'rose', '2', '%,', 'to', '$', '11', '.', '1bn', '.']
    """
    return TOKEN_PATTERN.findall(text.lower())


def _sha256_bucket(text: str, num_buckets: int) -> int:
    # "surrogatepass": a lone surrogate (which the reference cannot encode) hashes instead of raising
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest(), "big") % num_buckets


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place on a ``uint64`` array (arithmetic wraps mod 2^64)."""
    x ^= x >> _SHIFT
    x *= _FMIX[0]
    x ^= x >> _SHIFT
    x *= _FMIX[1]
    x ^= x >> _SHIFT
    return x


# ---------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class HashedNgrams:
    """The hashed n-grams of D documents, stored flat (~2 bytes per n-gram with 10,000 buckets).

    Attributes:
        buckets: ``[M]`` bucket of every n-gram, grouped by document (document i's n-grams are
            ``buckets[offsets[i]:offsets[i + 1]]``); the smallest unsigned dtype that holds them.
        offsets: ``[D + 1]`` int64 start of each document's n-grams.
        lengths: ``[D]`` int64 tokens per document (what the length filter compares).
        num_buckets, ngrams, ngram_hash: the :class:`NgramHasher` settings that produced them.
    """

    buckets: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    num_buckets: int
    ngrams: int
    ngram_hash: NgramHash

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def totals(self) -> np.ndarray:
        """``[num_buckets]`` int64 n-gram counts summed over all documents."""
        return np.bincount(self.buckets, minlength=self.num_buckets).astype(np.int64)

    def counts(self) -> np.ndarray:
        """Dense ``[D, num_buckets]`` int64 count matrix (the reference's per-document features).

        D x num_buckets integers: for inspection and small sets only.
        """
        rows = np.repeat(np.arange(len(self)), np.diff(self.offsets))
        dense = np.zeros((len(self), self.num_buckets), dtype=np.int64)
        np.add.at(dense, (rows, self.buckets.astype(np.int64)), 1)
        return dense

    def dot(self, values: np.ndarray, block: int = 1 << 16) -> np.ndarray:
        """``[D]`` float64: ``values . counts(document)`` for every document, without the dense matrix.

        Args:
            values: ``[num_buckets]`` per-bucket values (DSIR's ``log_diff``).
            block: documents per step (bounds the temporary memory).
        """
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.num_buckets,):
            raise ValueError(f"values must have shape ({self.num_buckets},), got {values.shape}")
        out = np.zeros(len(self), dtype=np.float64)
        for start in range(0, len(self), block):
            stop = min(start + block, len(self))
            lo, hi = int(self.offsets[start]), int(self.offsets[stop])
            per_ngram = np.append(values[self.buckets[lo:hi]], 0.0)  # the 0 keeps empty last documents in range
            sums = np.add.reduceat(per_ngram, self.offsets[start:stop] - lo)
            empty = self.offsets[start + 1 : stop + 1] == self.offsets[start:stop]
            out[start:stop] = np.where(empty, 0.0, sums)  # reduceat returns the next element for an empty range
        return out

    @staticmethod
    def concatenate(parts: Sequence[HashedNgrams]) -> HashedNgrams:
        """One :class:`HashedNgrams` of all documents of ``parts``, in order (all made by one hasher setting)."""
        if not parts:
            raise ValueError("nothing to concatenate: pass at least one HashedNgrams")
        first = parts[0]
        settings = {(p.num_buckets, p.ngrams, p.ngram_hash) for p in parts}
        if len(settings) > 1:
            raise ValueError(f"HashedNgrams of different hasher settings cannot be mixed: {sorted(settings)}")
        starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([np.zeros(1, np.int64)] + [p.offsets[1:] + s for p, s in zip(parts, starts)])
        return HashedNgrams(
            np.concatenate([p.buckets for p in parts]),
            offsets,
            np.concatenate([p.lengths for p in parts]),
            first.num_buckets,
            first.ngrams,
            first.ngram_hash,
        )


class _NgramBuckets(dict):
    """n-gram string -> its reference (sha256) bucket, computed on first sight."""

    def __init__(self, num_buckets: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets

    def __missing__(self, ngram: str) -> int:
        bucket = self[ngram] = _sha256_bucket(ngram, self.num_buckets)
        return bucket


_CHAR_CLASSES: np.ndarray | None = None


def _char_classes() -> np.ndarray:
    """``[0x110000]`` uint8 per code point: 1 word character (``\\w``: ``isalnum()`` or ``_``, as
    Python's ``re`` decides it), 0 whitespace (``\\s``: ``isspace()``), 2 anything else. Built once."""
    global _CHAR_CLASSES
    if _CHAR_CLASSES is None:
        chars = "".join(map(chr, range(0x110000)))
        word = (c.isalnum() or c == "_" for c in chars)
        space = np.fromiter(map(str.isspace, chars), bool, 0x110000)
        _CHAR_CLASSES = np.where(np.fromiter(word, bool, 0x110000), 1, np.where(space, 0, 2)).astype(np.uint8)
    return _CHAR_CLASSES


def _ngram_grid(lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An empty ``[tokens, n]`` grid (row p, column j - 1: the j-gram starting at token p) and, per
    token, the tokens from it to the end of its document: a j-gram starts at p iff that is >= j."""
    remaining = np.repeat(np.cumsum(lengths), lengths) - np.arange(int(lengths.sum()))
    return np.zeros((remaining.shape[0], n), dtype=np.int64), remaining


class NgramHasher:
    """Featurise texts into hashed n-gram counts, DSIR's features, a batch of documents at a time.

    ``ngram_hash="sha256"`` (default) tokenises with the regex and hashes every n-gram string like the
    reference (``int(sha256(s).hexdigest(), 16) % num_buckets``; one sha256 per distinct n-gram,
    cached, and a Python step per n-gram): the reference's buckets. The cache starts afresh after
    2^21 distinct n-grams, so memory stays bounded.

    ``ngram_hash="fold"`` (the named fast option, 2-3x faster) runs in numpy over the batch's
    characters, with no Python step per token: the lowercased batch becomes one array of code points; each code point's class
    (word character, whitespace, other - exactly the ``\\w``/``\\s`` of Python's ``re``) splits it
    into the word-punct tokens (maximal runs of word characters or of other characters); a token
    ``c_0 .. c_{L-1}`` gets the 64-bit key ``fmix64(sum_i c_i * P^i + L * G)`` (mod 2^64, ``P`` the
    FNV-64 prime ``0x100000001B3``, ``G = 0x9E3779B97F4A7C15``, ``fmix64`` MurmurHash3's 64-bit
    finaliser), computed from prefix sums; an n-gram's key folds its tokens' keys,
    ``g <- fmix64(g * G + key)``; its bucket is ``key % num_buckets``. The hash is a fixed function
    of the text - no process salt, no vocabulary order - so every rank and process computes the
    same buckets. Its buckets differ from the reference's sha256, so selections agree with the
    reference's statistically, not document for document (see the module docstring).

    Call it with batches (thousands of documents); :meth:`batches` and :meth:`featurize` split
    a corpus. Memory per batch is ~50 bytes per character.

    Args:
        ngrams: n, the longest n-gram counted (2: unigrams and bigrams, the reference's default).
        num_buckets: hash buckets (the reference's default 10,000).
        ngram_hash: ``"sha256"`` (the reference's buckets) or ``"fold"`` (2-3x faster, other buckets).

    Raises:
        ValueError: ``ngrams`` or ``num_buckets`` below 1, ``num_buckets`` of 2^32 or more, or an
            unknown ``ngram_hash``.

    Example:
        >>> hasher = NgramHasher(ngrams=2, num_buckets=16)
        >>> features = hasher(["The cat sat.", "A dog"])
        >>> features.lengths.tolist(), features.counts().sum(axis=1).tolist()
        ([4, 2], [7, 3])
    """

    def __init__(self, ngrams: int = 2, num_buckets: int = 10_000, ngram_hash: NgramHash = "sha256") -> None:
        if ngrams < 1:
            raise ValueError(f"ngrams must be >= 1 (1: unigrams only, 2: unigrams and bigrams), got {ngrams}")
        if not 1 <= num_buckets < 1 << 32:
            raise ValueError(f"num_buckets must be in [1, 2^32), got {num_buckets}")
        if ngram_hash not in ("fold", "sha256"):
            raise ValueError(f"ngram_hash must be 'fold' or 'sha256', got {ngram_hash!r}")
        self.ngrams = ngrams
        self.num_buckets = num_buckets
        self.ngram_hash: NgramHash = ngram_hash
        self._dtype = np.min_scalar_type(num_buckets - 1)
        self._ngram_buckets = _NgramBuckets(num_buckets)
        self._powers = np.ones(1, dtype=np.uint64)  # P^i, and the inverse P^-i, mod 2^64
        self._inverse_powers = np.ones(1, dtype=np.uint64)

    def __call__(self, texts: Sequence[str]) -> HashedNgrams:
        """Hashed n-grams of one batch of documents.

        Raises:
            TypeError: ``texts`` is a single string, or holds something other than strings.
        """
        if isinstance(texts, str):
            raise TypeError("NgramHasher takes a sequence of texts, not one string: wrap it in a list")
        try:
            lowered = [text.lower() for text in texts]
        except AttributeError as error:
            raise TypeError(f"NgramHasher takes texts (str), e.g. [row['text'] for row in rows]; got: {error}") from None
        n, buckets = self.ngrams, np.uint64(self.num_buckets)
        if self.ngram_hash == "fold":
            keys, lengths = self._token_keys(lowered)
            grid, remaining = _ngram_grid(lengths, n)
            grid[:, 0] = keys % buckets
            folded = keys
            for order in range(2, n + 1):
                folded = folded[:-1] * _GOLDEN
                folded += keys[order - 1 :]
                grid[: folded.shape[0], order - 1] = _fmix64(folded) % buckets
        else:
            per_document = [TOKEN_PATTERN.findall(text) for text in lowered]
            lengths = np.fromiter(map(len, per_document), np.int64, len(per_document))
            tokens = list(chain.from_iterable(per_document))
            grid, remaining = _ngram_grid(lengths, n)
            grid[:, 0] = self._sha256_buckets(tokens)
            for order in range(2, n + 1):
                starts = np.flatnonzero(remaining >= order).tolist()
                grid[starts, order - 1] = self._sha256_buckets([" ".join(tokens[p : p + order]) for p in starts])
        valid = remaining[:, None] >= np.arange(1, n + 1)
        per_doc = np.clip(lengths[:, None] - np.arange(n), 0, None).sum(axis=1)
        return HashedNgrams(
            grid[valid].astype(self._dtype),
            np.concatenate([np.zeros(1, np.int64), np.cumsum(per_doc)]),
            lengths.astype(np.int64),
            self.num_buckets,
            self.ngrams,
            self.ngram_hash,
        )

    def _sha256_buckets(self, ngrams: list[str]) -> np.ndarray:
        if len(self._ngram_buckets) > _CACHE_LIMIT:
            self._ngram_buckets = _NgramBuckets(self.num_buckets)
        return np.fromiter(map(self._ngram_buckets.__getitem__, ngrams), np.int64, len(ngrams))

    def _power_tables(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``P^i`` and ``P^-i`` mod 2^64 for ``i < size``; kept for the next batch up to 2^23 entries."""
        if self._powers.shape[0] >= size:
            return self._powers, self._inverse_powers
        tables = []
        for base in (_PRIME, _INVERSE_PRIME):
            table = np.full(size, base, dtype=np.uint64)
            table[0] = 1
            tables.append(np.cumprod(table, out=table))
        if size <= 1 << 23:
            self._powers, self._inverse_powers = tables
        return tables[0], tables[1]

    def _token_keys(self, lowered: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The fold keys of every token of the (lowercased) documents, in order, and tokens per document."""
        sizes = np.fromiter(map(len, lowered), np.int64, len(lowered)) + 1  # + the newline between documents
        document_start = np.cumsum(sizes) - sizes
        points = np.frombuffer("\n".join(lowered).encode("utf-32-le", "surrogatepass"), dtype="<u4")
        classes = _char_classes()[points]
        size = points.shape[0]
        change = np.ones(size + 1, dtype=bool)  # where a run of one class starts (and the end)
        np.not_equal(classes[1:], classes[:-1], out=change[1:size])
        bounds = np.flatnonzero(change)
        is_token = classes[bounds[:-1]] != 0
        starts, ends = bounds[:-1][is_token], bounds[1:][is_token]
        powers, inverse = self._power_tables(size + 1)
        prefix = np.zeros(size + 1, dtype=np.uint64)  # prefix[i] = sum_{j < i} points[j] * P^j
        np.cumsum(points * powers[:size], out=prefix[1:])
        polynomial = (prefix[ends] - prefix[starts]) * inverse[starts]  # sum_i c_i P^i from each token's start
        polynomial += (ends - starts).astype(np.uint64) * _GOLDEN
        lengths = np.bincount(np.searchsorted(document_start, starts, side="right") - 1, minlength=len(lowered))
        return _fmix64(polynomial), lengths

    def batches(self, texts: Iterable[str], *, batch_chars: int = 1 << 22) -> Iterator[HashedNgrams]:
        """Hashed n-grams of ``texts``, in order, in batches of about ``batch_chars`` characters.

        Texts are read lazily (a generator over a corpus on disk works); a batch holds whole
        documents, ~50 bytes of temporary memory per character (~200 MB at the default 2^22). To
        use more cores, give each process a shard of the corpus: the hash has no per-process
        state, so the shards' features are those of the whole.

        Raises:
            ValueError: ``batch_chars`` below 1.
            TypeError: ``texts`` is a single string.
        """
        if batch_chars < 1:
            raise ValueError(f"batch_chars must be >= 1, got {batch_chars}")
        if isinstance(texts, str):
            raise TypeError("NgramHasher takes a sequence of texts, not one string: wrap it in a list")
        batch: list[str] = []
        chars = 0
        for text in texts:
            batch.append(text)
            chars += len(text)
            if chars >= batch_chars:
                yield self(batch)
                batch, chars = [], 0
        if batch:
            yield self(batch)

    def featurize(self, texts: Iterable[str], *, batch_chars: int = 1 << 22) -> HashedNgrams:
        """Hashed n-grams of all ``texts`` as one :class:`HashedNgrams` (see :meth:`batches`)."""
        parts = list(self.batches(texts, batch_chars=batch_chars))
        return HashedNgrams.concatenate(parts) if parts else self([])


# ---------------------------------------------------------------------------------------- estimator
Corpus = Iterable[str] | HashedNgrams


class DSIRScores(NamedTuple):
    """Per-document results of :meth:`NgramImportance.score`.

    Attributes:
        log_weights: ``[D]`` float64 log importance weights, ``log_diff . counts(document)``.
        lengths: ``[D]`` int64 tokens per document (for the length filter).
    """

    log_weights: Tensor
    lengths: Tensor


@dataclass(frozen=True)
class NgramImportance:
    """DSIR's fitted importance estimator: bucket distributions of the target and the raw pool.

    Fit with :meth:`fit`; :meth:`score` weighs documents. The reference's
    ``HashedNgramDSIR.fit_importance_estimator`` and ``importance_estimator``
    (``data_selection/hashed_ngram_dsir.py``).

    Attributes:
        raw_probs, target_probs: ``[num_buckets]`` float64 bucket distributions.
        log_diff: ``[num_buckets]`` float64 ``log(target_probs + 1e-8) - log(raw_probs + 1e-8)``.
        ngrams, num_buckets, ngram_hash: the featuriser settings (texts scored later use the same).

    Example:
        >>> target = ["stocks rose and shares fell"] * 3
        >>> raw = ["stocks rose", "def f(x): return x", "shares fell", "import os"]
        >>> importance = NgramImportance.fit(target, raw, num_buckets=1000)
        >>> scores = importance.score(raw)
        >>> scores.log_weights.argsort(descending=True)[:2].sort().values.tolist()
        [0, 2]
    """

    raw_probs: np.ndarray
    target_probs: np.ndarray
    log_diff: np.ndarray
    ngrams: int
    num_buckets: int
    ngram_hash: NgramHash

    @classmethod
    def fit(
        cls,
        target: Corpus,
        raw: Corpus,
        *,
        ngrams: int = 2,
        num_buckets: int = 10_000,
        ngram_hash: NgramHash = "sha256",
        target_smoothing: float = 0.0,
        max_raw_ngrams: int | Literal["auto", "all"] = "auto",
        batch_chars: int = 1 << 22,
    ) -> NgramImportance:
        """Fit the target and raw bucket distributions.

        Args:
            target: target texts, or their :class:`HashedNgrams`; all of them are counted.
            raw: raw texts (any iterable, read once, in batches), or their :class:`HashedNgrams`.
            ngrams, num_buckets, ngram_hash: featuriser settings, see :class:`NgramHasher`.
            target_smoothing: Laplace pseudo-count added to every target bucket before normalising
                (``target_laplace_smoothing`` on the reference's main branch; not in the 1.0.3
                wheel). Can help a small target set: every n-gram it never shows otherwise costs
                ~log(1e-8), which penalises long documents (see ``tests/selection/test_dsir.py``).
            max_raw_ngrams: raw n-grams counted before the raw fit stops: documents are counted in
                order until the total first exceeds it (that document included). ``"auto"``:
                ``100_000 * num_buckets``, ``"all"``: no limit - the reference's ``num_tokens_to_fit``.
            batch_chars: see :meth:`NgramHasher.batches` (texts only).

        Raises:
            ValueError: the target or the raw texts have no tokens; ``target_smoothing < 0``;
                ``max_raw_ngrams`` below 1; features made with other settings.
        """
        if target_smoothing < 0:
            raise ValueError(f"target_smoothing is a pseudo-count and must be >= 0, got {target_smoothing}")
        budget = {"auto": 100_000 * num_buckets, "all": None}.get(max_raw_ngrams, max_raw_ngrams)  # type: ignore[arg-type]
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise ValueError(f"max_raw_ngrams must be 'auto', 'all' or a positive int, got {max_raw_ngrams!r}")
        hasher = NgramHasher(ngrams, num_buckets, ngram_hash)
        target_counts = np.zeros(num_buckets, dtype=np.int64)
        for part in _feature_batches(target, hasher, batch_chars):
            target_counts += part.totals()
        raw_counts = np.zeros(num_buckets, dtype=np.int64)
        for part in _feature_batches(raw, hasher, batch_chars):
            if budget is not None and raw_counts.sum() + part.offsets[-1] > budget:
                # stop after the first document that takes the count past the budget
                cumulative = raw_counts.sum() + part.offsets[1:]
                stop = int(np.argmax(cumulative > budget)) + 1
                raw_counts += np.bincount(part.buckets[: part.offsets[stop]], minlength=num_buckets)
                break
            raw_counts += part.totals()
        if target_counts.sum() == 0:
            raise ValueError("the target texts have no tokens: DSIR needs at least one non-empty target document")
        if raw_counts.sum() == 0:
            raise ValueError("the raw texts have no tokens: DSIR needs at least one non-empty raw document")
        smoothed = target_counts + target_smoothing
        target_probs = smoothed / smoothed.sum()
        raw_probs = raw_counts / raw_counts.sum()
        log_diff = np.log(target_probs + LOG_EPSILON) - np.log(raw_probs + LOG_EPSILON)
        return cls(raw_probs, target_probs, log_diff, ngrams, num_buckets, ngram_hash)

    def score(self, raw: Corpus, *, batch_chars: int = 1 << 22) -> DSIRScores:
        """Log importance weights and token lengths of every document of ``raw``, in order.

        Raises:
            ValueError: ``raw`` is :class:`HashedNgrams` made with other settings.
        """
        hasher = NgramHasher(self.ngrams, self.num_buckets, self.ngram_hash)
        weights, lengths = [], []
        for part in _feature_batches(raw, hasher, batch_chars):
            weights.append(part.dot(self.log_diff))
            lengths.append(part.lengths)
        if not weights:
            return DSIRScores(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
        return DSIRScores(torch.from_numpy(np.concatenate(weights)), torch.from_numpy(np.concatenate(lengths)))


def _feature_batches(corpus: Corpus, hasher: NgramHasher, batch_chars: int) -> Iterator[HashedNgrams]:
    if isinstance(corpus, HashedNgrams):
        made = (corpus.ngrams, corpus.num_buckets, corpus.ngram_hash)
        wanted = (hasher.ngrams, hasher.num_buckets, hasher.ngram_hash)
        if made != wanted:
            raise ValueError(
                f"features were made with (ngrams, num_buckets, ngram_hash) = {made}, the estimator uses {wanted}:"
                " featurise with NgramHasher(*settings) of the estimator, or pass the texts"
            )
        return iter([corpus])
    return hasher.batches(corpus, batch_chars=batch_chars)


# ---------------------------------------------------------------------------------------- selection
def eligible_mask(lengths: Tensor | np.ndarray | Sequence[int], min_length: int) -> Tensor:
    """``[D]`` bool: documents of at least ``min_length`` tokens (the reference's length filter).

    Raises:
        ValueError: ``min_length < 0``.
    """
    if min_length < 0:
        raise ValueError(f"min_length must be >= 0, got {min_length}")
    return torch.as_tensor(np.asarray(lengths)) >= min_length


def _as_log_weights(log_weights: Tensor | np.ndarray | Sequence[float]) -> Tensor:
    values = torch.as_tensor(np.asarray(log_weights, dtype=np.float64))
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"log_weights must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("log_weights must be finite (DSIR's log weights always are; check the input)")
    return values


def resample(
    log_weights: Tensor | np.ndarray | Sequence[float],
    k: int,
    *,
    seed: int = 0,
    top_k: bool = False,
    eligible: Tensor | None = None,
) -> Tensor:
    """Choose ``k`` documents without replacement with probability proportional to their weights.

    Gumbel-top-k (the reference's ``DSIR.resample``, ``data_selection/base.py``): the k largest
    ``log w_i + G_i`` with ``G_i`` standard Gumbel is a draw of k items without replacement where
    each next item is chosen with probability proportional to ``w_i`` among those left.
    ``top_k=True`` drops the noise and takes the k largest weights. The noise comes from a
    ``torch.Generator`` seeded with ``seed``, so every rank draws the same selection; ties are
    broken by document index.

    Args:
        log_weights: ``[N]`` finite log importance weights (:meth:`NgramImportance.score`).
        k: documents to choose.
        seed: seed of the Gumbel noise.
        top_k: the k largest weights instead of sampling.
        eligible: ``[N]`` bool, documents that may be chosen (e.g. :func:`eligible_mask`).

    Returns:
        ``[k]`` int64 document indices, highest key first.

    Raises:
        ValueError: ``k`` is not in ``[1, number of eligible documents]``; bad ``log_weights``.

    Example:
        >>> resample(torch.tensor([0.0, 5.0, 1.0, 4.0]), 2, top_k=True).tolist()
        [1, 3]
    """
    values = _as_log_weights(log_weights)
    n = values.numel()
    allowed = torch.ones(n, dtype=torch.bool) if eligible is None else torch.as_tensor(eligible, dtype=torch.bool)
    if allowed.shape != (n,):
        raise ValueError(f"eligible must have shape ({n},), got {tuple(allowed.shape)}")
    available = int(allowed.sum())
    if not 1 <= k <= available:
        raise ValueError(
            f"cannot choose k={k} of {available} eligible documents (of {n}): choose 1 <= k <= {available}, or admit"
            " more documents (a smaller min_length)"
        )
    keys = values.clone()
    if not top_k:
        uniform = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        keys -= torch.log(-torch.log(uniform.clamp_min_(torch.finfo(torch.float64).tiny)))  # Gumbel noise
    keys[~allowed] = -torch.inf
    return torch.sort(keys, descending=True, stable=True).indices[:k]


def importance_factors(
    log_weights: Tensor | np.ndarray | Sequence[float],
    *,
    eligible: Tensor | None = None,
    max_weight: float | None = None,
) -> Tensor:
    """Loss factors ``w_i`` proportional to ``exp(log_weights_i)`` with mean 1 over the eligible documents.

    ``mean_i(w_i l_i)`` over the raw documents then estimates the target's mean loss
    (self-normalised importance sampling). Hashed n-gram log weights spread over tens to hundreds
    of nats, so a few documents can carry nearly all of the weight; ``max_weight`` caps every
    factor and raises the others so that the mean stays 1 (water-filling: ``min(c w_i, max_weight)``
    with the one ``c`` that keeps the mean), trading bias for variance.

    Args:
        log_weights: ``[N]`` finite log importance weights.
        eligible: ``[N]`` bool; other documents get factor 0.
        max_weight: cap on every factor (>= 1, since the mean is 1), or ``None`` for none.

    Returns:
        ``[N]`` float32 factors.

    Raises:
        ValueError: ``max_weight < 1``, no eligible document, bad ``log_weights``.

    Example:
        >>> importance_factors(torch.tensor([0.0, 0.0, 2.0])).sum().item()
        3.0
    """
    values = _as_log_weights(log_weights)
    allowed = torch.ones(values.numel(), dtype=torch.bool) if eligible is None else torch.as_tensor(eligible, dtype=torch.bool)
    if not allowed.any():
        raise ValueError("no eligible document to weight: admit more documents (a smaller min_length)")
    if max_weight is not None and max_weight < 1.0:
        raise ValueError(f"max_weight must be >= 1 (the factors have mean 1), got {max_weight}")
    chosen = values[allowed]
    m = chosen.numel()
    log_scale = math.log(m) - torch.logsumexp(chosen, 0)  # exp(chosen + log_scale) has mean 1; logs: no overflow
    if max_weight is not None and float(chosen.max() + log_scale) > math.log(max_weight):
        # Cap the j largest and scale the rest by c = (m - j * cap) / (their sum), for the first j
        # at which the largest uncapped factor stays within the cap (one exists for any cap >= 1).
        ordered = torch.sort(chosen, descending=True).values
        log_rest = torch.logcumsumexp(ordered.flip(0), 0).flip(0)  # log of the sum of exp(ordered[j:])
        budget = m - torch.arange(m, dtype=torch.float64) * max_weight
        fits = (budget > 0) & (budget.clamp_min(1e-300).log() - log_rest + ordered <= math.log(max_weight) + 1e-12)
        first = int(torch.nonzero(fits)[0])
        log_scale = math.log(float(budget[first])) - log_rest[first]
    w = torch.exp(chosen + log_scale)
    if max_weight is not None:
        w = w.clamp_(max=max_weight)
    factors = torch.zeros(values.numel(), dtype=torch.float32)
    factors[allowed] = w.float()
    return factors


# ---------------------------------------------------------------------------------------- sampler
class DSIRSampler(EpochSampler):
    """Train on the target-like part of a text pool: DSIR (Xie et al., 2023) as an epoch plan.

    "Data Selection for Language Models via Importance Resampling", S. M. Xie et al. (NeurIPS
    2023); code ``p-lambda/dsir`` (``data_selection/hashed_ngram_dsir.py``, ``base.py``). Built
    from every sample's log importance weight (:meth:`from_texts` computes them from the
    samples' texts and a target set; see the module docstring for the method and its departures
    from the reference):

    * ``mode="resample"`` (the paper): ``fraction * N`` samples are chosen once, by Gumbel-top-k
      (``top_k=True``: the highest weights) among those of at least ``min_length`` tokens, drawn
      with seed ``seed + 2**32`` (apart from the epochs' orders, seeded ``seed + epoch``) - the
      same selection on every rank. Each epoch visits the selection in a fresh order. No loss
      correction: the selection *is* the target-like data.
    * ``mode="weight"``: every eligible sample, every epoch, its loss multiplied by its importance
      weight normalised to mean 1 (:func:`importance_factors`, capped at ``max_weight``), so the
      objective estimates the target distribution's loss on all the data. ``fraction`` and
      ``top_k`` are not used. Uncapped DSIR weights are very uneven (a few samples can hold most
      of the mass; on ``benchmarks/dsir.py``'s pool of 15,711 documents the effective sample size
      is 0.01% of N uncapped, 1% at ``max_weight=100`` and 10% at 10): cap them.

    The factors reach the loss through :class:`weightwise.callbacks.DataPruning`, multiplied with
    any other factor (docs/architecture.md, contract 3). Every rank computes the same plan: the
    features depend only on the texts, and the weights are bit-identical under one software build.

    Args:
        log_weights: ``[N]`` log importance weights, one per dataset index.
        fraction: samples kept in ``"resample"`` mode, as a fraction of N (rounded to a multiple
            of the world size).
        mode: ``"resample"`` or ``"weight"``.
        lengths: ``[N]`` tokens per sample, for the length filter (needed when ``min_length > 0``).
        min_length: shortest sample (tokens) eligible; the reference's ``min_example_length=100``.
            0 keeps every sample (short samples by construction: sentences, fixed windows).
        top_k: ``"resample"`` mode: the highest weights instead of sampling.
        max_weight: ``"weight"`` mode: cap on the factors (``None``: uncapped). The paper has no weight
            mode to take a default from; 10 keeps the effective sample size at about a tenth of N on
            the benchmark's pool instead of a few samples.
        seed, num_replicas, rank: see :class:`EpochSampler`.

    Raises:
        ValueError: unknown ``mode``; ``min_length > 0`` without ``lengths``; lengths of another
            size; no sample passes the length filter; bad ``log_weights``, ``fraction`` or ``max_weight``.

    Example:
        >>> texts = ["shares rose on strong quarterly profits"] * 4 + ["def main(): return 0"] * 4
        >>> sampler = DSIRSampler.from_texts(texts, ["profits and shares rose"], fraction=0.5, min_length=0)
        >>> sorted(sampler)
        [0, 1, 2, 3]
    """

    def __init__(
        self,
        log_weights: Tensor | np.ndarray | Sequence[float],
        fraction: float = 0.5,
        *,
        mode: DSIRMode = "resample",
        lengths: Tensor | np.ndarray | Sequence[int] | None = None,
        min_length: int = 100,
        top_k: bool = False,
        max_weight: float | None = 10.0,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        weights = _as_log_weights(log_weights)
        super().__init__(weights.numel(), seed=seed, num_replicas=num_replicas, rank=rank)
        if mode not in ("resample", "weight"):
            raise ValueError(f"mode must be 'resample' or 'weight', got {mode!r}")
        if lengths is None:
            if min_length > 0:
                raise ValueError(
                    f"min_length={min_length} filters by length, but no lengths were given: pass lengths= (tokens per"
                    " sample, NgramImportance.score gives them) or min_length=0"
                )
            lengths = torch.zeros(self.num_samples, dtype=torch.int64)
        self.lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.int64)
        if self.lengths.shape != (self.num_samples,):
            raise ValueError(
                f"lengths must have one entry per sample ({self.num_samples}), got shape {tuple(self.lengths.shape)}"
            )
        self.eligible = eligible_mask(self.lengths, min_length)
        if not self.eligible.any():
            raise ValueError(
                f"no sample has min_length={min_length} tokens (longest: {int(self.lengths.max())}): pass a smaller"
                " min_length (0 keeps every sample)"
            )
        self.log_weights = weights
        self.fraction = check_fraction("fraction", fraction)
        self.mode: DSIRMode = mode
        self.min_length = min_length
        self.top_k = top_k
        self.max_weight = max_weight
        self._factors = importance_factors(weights, eligible=self.eligible, max_weight=max_weight) if mode == "weight" else None
        self._selection: tuple[int, Tensor] | None = None  # (k, chosen ids)

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        target_texts: Iterable[str],
        fraction: float = 0.5,
        *,
        ngrams: int = 2,
        num_buckets: int = 10_000,
        ngram_hash: NgramHash = "sha256",
        target_smoothing: float = 0.0,
        batch_chars: int = 1 << 22,
        **kwargs: Any,
    ) -> DSIRSampler:
        """A sampler over ``texts`` (sample i's text is ``texts[i]``) toward ``target_texts``.

        Featurises the texts once (:class:`NgramHasher`), fits :class:`NgramImportance` and scores
        every sample; ``kwargs`` go to the constructor (``mode``, ``min_length``, ``seed``, ...).

        Raises:
            ValueError: see :meth:`NgramImportance.fit` and the constructor.
        """
        hasher = NgramHasher(ngrams, num_buckets, ngram_hash)
        raw = hasher.featurize(texts, batch_chars=batch_chars)
        importance = NgramImportance.fit(
            target_texts,
            raw,
            ngrams=ngrams,
            num_buckets=num_buckets,
            ngram_hash=ngram_hash,
            target_smoothing=target_smoothing,
            batch_chars=batch_chars,
        )
        scores = importance.score(raw)
        return cls(scores.log_weights, fraction, lengths=scores.lengths, **kwargs)

    def selection(self) -> Tensor:
        """``"resample"`` mode: the chosen sample ids (highest key first), drawn once and cached.

        Raises:
            ValueError: fewer eligible samples than the subset size.
        """
        k = self.subset_size(self.fraction)
        available = int(self.eligible.sum())
        if k > available:
            raise ValueError(
                f"fraction={self.fraction} asks for {k} of {self.num_samples} samples, but only {available} have"
                f" min_length={self.min_length} tokens: pass a smaller fraction or min_length"
            )
        if self._selection is None or self._selection[0] != k:
            chosen = resample(
                self.log_weights, k, seed=self.seed + _SELECTION_SEED_OFFSET, top_k=self.top_k, eligible=self.eligible
            )
            self._selection = (k, chosen)
        return self._selection[1]

    def plan_epoch(self, epoch: int, generator: torch.Generator) -> EpochPlan:
        if self.mode == "weight":
            ids = torch.nonzero(self.eligible).flatten()
            return EpochPlan(ids[torch.randperm(ids.numel(), generator=generator)], self._factors)
        chosen = self.selection()
        return EpochPlan(chosen[torch.randperm(chosen.numel(), generator=generator)])
