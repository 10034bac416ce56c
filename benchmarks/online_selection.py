"""weightwise's OnlineBatchSelection side by side with Composer's SelectiveBackprop, same model, data and seeds.

    .venv/bin/python -m benchmarks.online_selection                      # 4 methods x 3 seeds (26 min, 2-core CPU)
    .venv/bin/python -m benchmarks.online_selection --steps 40 --seeds 0  # a smoke run

The model and data of ``benchmarks/lm_reweighting.py`` (a byte-level Llama, hidden 128, 4 layers,
trained from scratch with AdamW on packed 128-byte rows of streamed BBC News, 16 rows a step), run
four ways for each seed - same initialisation, same data order, same number of optimizer steps:

* ``plain``: Lightning ``Trainer``, the plain mean loss.
* ``plain_loop``: the same in a plain PyTorch loop (``zero_grad``, ``backward``, ``step``) - it
  must end where ``plain`` ends (checked: the loops are equivalent), and it prices Lightning's
  per-step overhead.
* ``composer``: the plain loop with Composer's ``should_selective_backprop`` and
  ``select_using_loss`` (mosaicml 0.32.1) applied as ``SelectiveBackprop.apply`` applies them:
  at every batch, ``should_selective_backprop(elapsed fraction of the run, batch index, start,
  end, interrupt)``; if it holds, ``select_using_loss(input, target, model, loss(..., reduction=
  "none"), keep, scale_factor=1)`` replaces the batch by the kept rows. Composer's selection
  slices one input tensor, so the input is ``input_ids`` and ``position_ids`` stacked
  (``[B, 2, T]``); the per-row loss is the mean cross-entropy over the row's target bytes - what
  weightwise scores rows by (``CausalLM(loss_mode="rows")``).
* ``weightwise``: Lightning with ``OnlineBatchSelection`` at the same settings (Composer's
  defaults: keep 0.5, start 0.5, end 0.9, interrupt 2, loss-rank sampling).

Reported per method (mean ± std over seeds): final validation loss and perplexity
(``torchmetrics.text.Perplexity`` over ``--val-batches`` x 16 held-out rows), rows backpropagated,
rows forwarded (the selection pass forwards whole batches without gradients), the selection
pass' seconds and the training wall time. The rule check: how often each loss rank of a batch
is kept, (1) over many draws on one fixed batch of scores by each implementation, and (2) over
the real selection steps of the ``composer`` and ``weightwise`` runs.

Composer on this environment: mosaicml 0.32.1 pins torch < 2.7.1 and torchvision, so it is
installed without dependencies into ``benchmarks/.cache/composer`` (gitignored; the benchmark
does it on first use, from the package index pip is configured with), and PyPI's torchvision does
not load with torch 2.13 - so ``benchmarks/.cache/torchvision_stub`` holds an *import stub*: a
package ``torchvision`` whose modules hand out placeholder classes for any name, which raise when
instantiated. It only satisfies the import-time references of Composer's vision code (its image
algorithms, datasets and metrics), none of which runs here; ``select_using_loss`` and
``should_selective_backprop`` use torch and numpy only. Neither Composer's code nor the stub is
committed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity

from benchmarks.lm_reweighting import BATCH_SIZE, SEQ_LEN, MeteredLM, machine, mean_std
from examples.language_modeling import IGNORE_INDEX, NewsStreamDataModule, PackedTextStream
from weightwise.callbacks import OnlineBatchSelection
from weightwise.selection.online import select_indices

CACHE = Path(__file__).resolve().parent / ".cache"
COMPOSER_PACKAGES = ("mosaicml==0.32.1", "importlib_metadata", "lazy_importer", "mcli", "coolname")
"""Composer and the modules it imports at start-up that the venv lacks (installed with --no-deps)."""
STUB_MODULES = (
    "__init__.py", "transforms/__init__.py", "transforms/functional.py", "datasets/__init__.py",
    "models/__init__.py", "models/resnet.py", "utils/__init__.py", "ops/__init__.py",
)
"""The torchvision modules Composer imports at import time."""
STUB_SOURCE = '''"""Import stub written by benchmarks/online_selection.py - NOT torchvision.

Any name is a placeholder class that raises when instantiated: it satisfies the import-time
references of Composer's vision code, which the benchmark never runs.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{__name__}.{name} is an import stub (benchmarks/online_selection.py), not torchvision")

    return type(name, (), {"__init__": refuse, "__module__": __name__})
'''
METHODS = ("plain", "plain_loop", "composer", "weightwise")
ComposerSelect = Callable[..., tuple[Tensor, Tensor]]


def composer_functions(cache: Path = CACHE) -> tuple[ComposerSelect, Callable[..., bool]]:
    """Composer's ``select_using_loss`` and ``should_selective_backprop``, installing Composer and
    writing the torchvision import stub under ``cache`` first if needed."""
    target, stub = cache / "composer", cache / "torchvision_stub"
    if not (target / "composer").is_dir():
        print(f"installing {' '.join(COMPOSER_PACKAGES)} into {target} (--no-deps)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        *COMPOSER_PACKAGES], check=True)
    for module in STUB_MODULES:
        path = stub / "torchvision" / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(STUB_SOURCE)
    sys.path.insert(0, str(stub))  # before any torchvision of the environment's own
    sys.path.append(str(target))  # after the environment's packages: only what it lacks comes from here
    from composer.algorithms.selective_backprop.selective_backprop import select_using_loss, should_selective_backprop

    return select_using_loss, should_selective_backprop


def row_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B]`` mean next-byte cross-entropy over each row's target bytes (Composer's per-sample loss here)."""
    targets = labels[:, 1:]
    tokens = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    mask = targets != IGNORE_INDEX
    return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)


class RankCounts:
    """How often each loss rank of a batch (0: lowest loss) was kept, over the selection steps."""

    def __init__(self, batch_size: int) -> None:
        self.counts = torch.zeros(batch_size, dtype=torch.long)
        self.batches = 0

    def record(self, scores: Tensor, rows: Tensor, kept_rows: Tensor) -> None:
        """Count the ranks of ``kept_rows`` (found among ``rows`` by content) by ``scores``."""
        rank = torch.empty_like(self.counts)
        rank[torch.argsort(scores.detach().cpu(), stable=True)] = torch.arange(scores.numel())
        kept = (rows[:, None] == kept_rows[None]).all(-1).float().argmax(0)  # index of each kept row
        self.counts += torch.bincount(rank[kept], minlength=self.counts.numel())
        self.batches += 1

    def frequencies(self) -> list[float]:
        return (self.counts / max(self.batches, 1)).tolist()


class SelectionLM(MeteredLM):
    """``MeteredLM`` that also records which loss ranks the online selection kept: the scoring pass
    (no gradients) remembers the batch and its row losses, the step that follows names the rows."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ranks = RankCounts(BATCH_SIZE)
        self._scored: tuple[Tensor, Tensor] | None = None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | dict[str, Tensor]:
        output = super().training_step(batch, batch_idx)
        if not torch.is_grad_enabled():
            assert isinstance(output, dict)
            mask = output["mask"]
            self._scored = (batch["input_ids"], (output["loss"] * mask).sum(1) / mask.sum(1).clamp(min=1))
        elif self._scored is not None:
            rows, scores = self._scored
            self.ranks.record(scores, rows, batch["input_ids"])
            self._scored = None
        return output


class TrainClock(Callback):
    """Seconds from Lightning's train start to its end (set-up and teardown excluded, like the loop's clock)."""

    def __init__(self) -> None:
        self.start = self.seconds = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def evaluate(model: MeteredLM, val_rows: list[dict[str, Tensor]], batches: int) -> dict[str, float]:
    """Validation perplexity and mean NLL over the first ``batches`` batches of held-out rows."""
    metric = Perplexity(ignore_index=IGNORE_INDEX)
    model.eval()
    with torch.no_grad():
        for batch in list(DataLoader(val_rows, batch_size=BATCH_SIZE))[:batches]:
            metric.update(model.logits(batch)[:, :-1].float(), batch["labels"][:, 1:])
    perplexity = float(metric.compute())
    return {"val_ppl": perplexity, "val_loss": float(np.log(perplexity))}


def run(method: str, seed: int, args: argparse.Namespace, data: NewsStreamDataModule,
        composer: tuple[ComposerSelect, Callable[..., bool]] | None) -> dict[str, Any]:
    """Train one method with one seed and evaluate it."""
    pl.seed_everything(seed, verbose=False)  # torch, numpy (Composer's draws) and Python
    model = SelectionLM(hidden_size=args.hidden, num_layers=args.layers, lr=args.lr,
                        loss_mode="rows" if method == "weightwise" else "mean")
    loader = DataLoader(PackedTextStream(data.train_files, SEQ_LEN, seed=seed), batch_size=BATCH_SIZE)
    if method in ("plain", "weightwise"):
        clock = TrainClock()
        callbacks: list[Callback] = [clock]
        if method == "weightwise":
            callbacks.append(OnlineBatchSelection(keep=args.keep, start=args.start, end=args.end, interrupt=args.interrupt, seed=seed))
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        )
        trainer.fit(model, train_dataloaders=loader)
        seconds = clock.seconds
    else:
        seconds = train_loop(model, loader, args, composer if method == "composer" else None)
    return {"method": method, "seed": seed, "train_seconds": seconds, "selection_seconds": model.selection_seconds,
            "rows_backpropagated": model.rows_backpropagated, "rows_forwarded": model.rows_forwarded,
            "selection_steps": model.ranks.batches, "rank_counts": model.ranks.counts.tolist(),
            **evaluate(model, data.val_set, args.val_batches)}


def train_loop(model: SelectionLM, loader: DataLoader, args: argparse.Namespace,
               composer: tuple[ComposerSelect, Callable[..., bool]] | None) -> float:
    """Plain PyTorch training for ``args.steps`` steps; with ``composer``, Composer's selective
    backprop as its ``SelectiveBackprop.apply`` does it. Returns the wall seconds."""
    optimizer = model.configure_optimizers()
    model.train()
    start = time.perf_counter()
    for batch_idx, batch in zip(range(args.steps), loader):
        if composer is not None and args.keep < 1:
            select_using_loss, should_selective_backprop = composer
            # SelectiveBackprop.match: the elapsed duration (batches / max batches) and batch_in_epoch.
            if should_selective_backprop(batch_idx / args.steps, batch_idx, args.start, args.end, args.interrupt):
                batch = composer_step(model, batch, select_using_loss, args.keep)
        loss = model.training_step(batch, batch_idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def composer_step(model: SelectionLM, batch: dict[str, Tensor], select_using_loss: ComposerSelect, keep: float) -> dict[str, Tensor]:
    """``SelectiveBackprop.apply`` on a packed batch: ``select_using_loss`` on (input, target), the kept rows back."""
    inputs = torch.stack([batch["input_ids"], batch["position_ids"]], dim=1)  # [B, 2, T]: one tensor to slice
    scored: dict[str, Tensor] = {}

    def forward(x: Tensor) -> Tensor:  # Composer's ``model = lambda X: state.model((X, None))``
        return model.model(input_ids=x[:, 0], position_ids=x[:, 1], use_cache=False).logits

    def loss(logits: Tensor, labels: Tensor, reduction: str = "none") -> Tensor:
        scored["losses"] = row_losses(logits, labels)
        return scored["losses"]

    start = time.perf_counter()
    kept_inputs, kept_labels = select_using_loss(inputs, batch["labels"], forward, loss, keep, 1)
    model.selection_seconds += time.perf_counter() - start
    model.rows_forwarded += inputs.shape[0]
    model.ranks.record(scored["losses"], batch["input_ids"], kept_inputs[:, 0])
    return {"input_ids": kept_inputs[:, 0], "position_ids": kept_inputs[:, 1], "labels": kept_labels}


def rule_check(select_using_loss: ComposerSelect, keep: float, draws: int) -> dict[str, Any]:
    """Keep frequency of each rank of one batch of 16 distinct scores over ``draws`` draws, by
    Composer's ``select_using_loss`` and weightwise's ``select_indices``, and the largest
    difference in standard errors."""
    scores = torch.arange(BATCH_SIZE, dtype=torch.float32)  # row i has rank i
    composer_counts, weightwise_counts = torch.zeros(BATCH_SIZE), torch.zeros(BATCH_SIZE)
    np.random.seed(0)
    generator = torch.Generator().manual_seed(0)
    identity = lambda x: x  # noqa: E731  - the "model" outputs the scores
    by_score = lambda out, target, reduction="none": out[:, 0]  # noqa: E731
    for _ in range(draws):
        kept, _ = select_using_loss(scores[:, None], scores.long(), identity, by_score, keep, 1)
        composer_counts[kept[:, 0].long()] += 1
        weightwise_counts[select_indices(scores, keep, "sample", generator)] += 1
    p, q = composer_counts / draws, weightwise_counts / draws
    standard_error = ((p * (1 - p) + q * (1 - q)) / draws).sqrt().clamp(min=1e-12)
    return {"draws": draws, "composer": p.tolist(), "weightwise": q.tolist(),
            "max_abs_difference": float((p - q).abs().max()), "max_z": float(((p - q).abs() / standard_error).max())}


def report(runs: list[dict[str, Any]], rules: dict[str, Any]) -> str:
    """Markdown tables: per method, and the keep frequency by loss rank."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["method"], r["seed"]): r for r in runs}
    lines = ["| method | val loss | Δ val loss vs plain, paired | val ppl | rows backprop | rows forwarded | selection pass s | train s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        column = lambda key: mean_std([float(r[key]) for r in mine])  # noqa: E731
        paired = [r["val_loss"] - by["plain", r["seed"]]["val_loss"] for r in mine if ("plain", r["seed"]) in by]
        delta = mean_std(paired) if paired and method != "plain" else "-"
        lines.append(f"| {method} | {column('val_loss')} | {delta} | {column('val_ppl')} | {column('rows_backpropagated')}"
                     f" | {column('rows_forwarded')} | {column('selection_seconds')} | {column('train_seconds')} |")
    if "plain" in methods and "plain_loop" in methods:
        gaps = [abs(by["plain", s]["val_loss"] - by["plain_loop", s]["val_loss"]) for s in seeds]
        lines += ["", f"Lightning vs plain loop, same seed, no selection: max |Δ val loss| = {max(gaps):.2e}"]
    pooled = {m: torch.tensor([r["rank_counts"] for r in runs if r["method"] == m]).sum(0) for m in ("composer", "weightwise")}
    steps = {m: sum(r["selection_steps"] for r in runs if r["method"] == m) for m in ("composer", "weightwise")}
    # In training, each rank's keep count over n steps is binomial(n, p_rank): p from the fixed-scores check.
    p = (torch.tensor(rules["composer"]) + torch.tensor(rules["weightwise"])) / 2
    frequency = {m: pooled[m] / max(steps[m], 1) for m in pooled}
    spread = (p * (1 - p) * (1 / max(steps["composer"], 1) + 1 / max(steps["weightwise"], 1))).sqrt().clamp(min=1e-12)
    training_z = float(((frequency["composer"] - frequency["weightwise"]).abs() / spread).max())
    lines += ["", f"Keep frequency by loss rank (0 = lowest loss of the batch of {BATCH_SIZE}); rule check over"
              f" {rules['draws']} draws each on fixed scores: max |Δ| = {rules['max_abs_difference']:.4f}"
              f" ({rules['max_z']:.1f} standard errors); in training, {steps['composer']} Composer and"
              f" {steps['weightwise']} weightwise selection steps, max |Δ| = {training_z:.1f} standard errors"
              " (the largest of 16 standard normals exceeds 2.7 one time in ten):", "",
              "| rank | Composer, fixed scores | weightwise, fixed scores | Composer, training | weightwise, training |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for rank in range(BATCH_SIZE):
        trained = [float(pooled[m][rank]) / max(steps[m], 1) for m in ("composer", "weightwise")]
        lines.append(f"| {rank} | {rules['composer'][rank]:.3f} | {rules['weightwise'][rank]:.3f}"
                     f" | {trained[0]:.3f} | {trained[1]:.3f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--start", type=float, default=0.5)
    parser.add_argument("--end", type=float, default=0.9)
    parser.add_argument("--interrupt", type=int, default=2)
    parser.add_argument("--val-batches", type=int, default=24, help="held-out batches of 16 rows")
    parser.add_argument("--rule-draws", type=int, default=20_000, help="draws of the fixed-scores rule check")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the 2-core VM is shared: 1 is faster)")
    parser.add_argument("--out", default="/tmp/online_selection.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, before = datetime.now(timezone.utc).isoformat(timespec="seconds"), machine()
    composer = composer_functions()
    rules = rule_check(composer[0], args.keep, args.rule_draws)
    data = NewsStreamDataModule(seq_len=SEQ_LEN, batch_size=BATCH_SIZE, val_articles=200)
    data.setup("fit")
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            runs.append(run(method, seed, args, data, composer))
            done = runs[-1]
            print(f"{method:>10} seed {seed}: val loss {done['val_loss']:.4f}  backprop rows {done['rows_backpropagated']}"
                  f"  train {done['train_seconds']:.1f} s", flush=True)
    tables = report(runs, rules)
    print(tables)
    payload = {"command": " ".join([sys.executable, "-m", "benchmarks.online_selection", *(argv or sys.argv[1:])]),
               "started": started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine_before": before, "machine_after": machine(), "args": vars(args), "rule_check": rules,
               "runs": runs, "tables": tables}
    with open(args.out, "w") as handle:
        json.dump(payload, handle, indent=1)
    print(f"raw results: {args.out}")


if __name__ == "__main__":
    main()
