"""Pre-training a small byte-level Llama from scratch on streamed BBC News: plain vs loss reweighting vs online selection.

    .venv/bin/python -m benchmarks.lm_reweighting                       # 3 methods x 3 seeds (21 min, 2-core CPU)
    .venv/bin/python -m benchmarks.lm_reweighting --steps 60 --seeds 0  # a smoke run

The setting of Sow et al. (ICLR 2025), shrunk to a CPU: a Llama (hidden 128, 4 layers, 4 heads,
vocabulary 256 bytes, ~0.7M parameters) trained from scratch with AdamW (lr 3e-3, constant) on
packed rows of 128 bytes, 16 rows a step, streamed from 2,025 BBC News articles
(``examples.language_modeling.NewsStreamDataModule``; a run sees each article at most once); 200
other articles are held out. Every method runs the same number of optimizer steps, from the same
initialisation and the same data order for a given seed:

* ``plain``: the HF mean over the batch's target bytes.
* ``linupper``: ``LossReweighting("linupper")`` with the paper's r = 0.4 over each packed document
  (weighted by its token share); the reference's 1000-step warm-up would cover the whole run, so
  the warm-up is ``--warmup-fraction`` (default 10%) of the steps.
* ``select``: ``OnlineBatchSelection()`` at Composer's ``SelectiveBackprop`` defaults (keep 0.5 of
  the rows, from 50% to 90% of the run, every 2nd step whole, loss-rank sampling).

Not in the default run (``--methods``):

* ``linupper_rows``: ``linupper`` with the row (the packed sequence of 128 bytes) as the sample,
  as Sow et al.'s trainer weights sequences, instead of each packed document.
* ``select_top``: the ``select`` window with ``method="top"`` - the highest training losses,
  RHO-LOSS's rule without its reference model (Loshchilov & Hutter's).

Reported: validation perplexity (``torchmetrics.text.Perplexity``, exp of the mean NLL over
``--val-batches`` x 16 held-out rows) at ``--checkpoints`` points of the run, against the tokens
(bytes) backpropagated and forwarded - the selection pass forwards whole batches without
gradients - and the training wall time (validation excluded). Raw results go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from examples.language_modeling import CausalLM, LossMode, NewsStreamDataModule
from weightwise.callbacks import LossReweighting, OnlineBatchSelection

SEQ_LEN, BATCH_SIZE = 128, 16
METHODS = ("plain", "linupper", "select", "linupper_rows", "select_top")


class MeteredLM(CausalLM):
    """``CausalLM`` that counts the rows it forwards with gradients (then backpropagates) and
    without (online selection's scoring pass), and the seconds spent in the latter."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows_backpropagated = 0
        self.rows_forwarded = 0
        self.selection_seconds = 0.0

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | dict[str, Tensor]:
        rows = int(batch["input_ids"].shape[0])
        self.rows_forwarded += rows
        if torch.is_grad_enabled():
            self.rows_backpropagated += rows
            return super().training_step(batch, batch_idx)
        start = time.perf_counter()
        output = super().training_step(batch, batch_idx)
        self.selection_seconds += time.perf_counter() - start
        return output


class Checkpoints(Callback):
    """Records, at every validation, the step, the tokens so far, the training seconds (validation
    excluded) and the validation loss and perplexity."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = self._validation_start = 0.0
        self._validation_seconds = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.perf_counter()
        assert isinstance(pl_module, MeteredLM)
        self.rows.append({
            "step": trainer.global_step,
            "tokens_backpropagated": pl_module.rows_backpropagated * SEQ_LEN,
            "tokens_forwarded": pl_module.rows_forwarded * SEQ_LEN,
            "train_seconds": self._validation_start - self._start - self._validation_seconds,
            "selection_seconds": pl_module.selection_seconds,
            "val_loss": float(trainer.callback_metrics["val_loss"]),
            "val_ppl": float(trainer.callback_metrics["val_ppl"]),
        })
        self._validation_seconds += now - self._validation_start


def method_setup(method: str, seed: int, args: argparse.Namespace) -> tuple[LossMode, list[Callback]]:
    """The model's loss mode and the weightwise callbacks of one method."""
    if method == "plain":
        return "mean", []
    if method in ("linupper", "linupper_rows"):
        warmup = round(args.warmup_fraction * args.steps)
        return "documents" if method == "linupper" else "rows", [LossReweighting("linupper", temperature=0.4, warmup_steps=warmup)]
    if method == "select":
        return "rows", [OnlineBatchSelection(seed=seed)]
    if method == "select_top":
        return "rows", [OnlineBatchSelection(method="top", seed=seed)]
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def run(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one method with one seed; return its checkpoints and totals."""
    loss_mode, callbacks = method_setup(method, seed, args)
    pl.seed_everything(seed, verbose=False)
    model = MeteredLM(hidden_size=args.hidden, num_layers=args.layers, lr=args.lr, loss_mode=loss_mode)
    data = NewsStreamDataModule(seq_len=SEQ_LEN, batch_size=BATCH_SIZE, val_articles=200, seed=seed)
    checkpoints = Checkpoints()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, val_check_interval=args.steps // args.checkpoints,
        limit_val_batches=args.val_batches, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, checkpoints],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    result: dict[str, Any] = {"method": method, "seed": seed, "loss_mode": loss_mode, "checkpoints": checkpoints.rows,
                              "fit_seconds": time.perf_counter() - start}
    for callback in callbacks:
        if isinstance(callback, OnlineBatchSelection):
            result["ledger"] = dict(callback.ledger)
        if isinstance(callback, LossReweighting):
            result["warmup_steps"] = callback.warmup_steps
    return result


def mean_std(values: Sequence[float]) -> str:
    """``mean ± sample std`` (just the value for one run)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def tables(runs: list[dict[str, Any]]) -> str:
    """Markdown: final values per method, paired differences to plain, and the checkpoints."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    lines = ["| method | val ppl (final) | val loss (final) | Δ loss vs plain, paired | tokens backprop (M) | tokens forward (M) | train s | selection-pass s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in methods:
        finals = [by[method, s]["checkpoints"][-1] for s in seeds if (method, s) in by]
        paired = [by[method, s]["checkpoints"][-1]["val_loss"] - by["plain", s]["checkpoints"][-1]["val_loss"]
                  for s in seeds if (method, s) in by and ("plain", s) in by]
        lines.append(
            f"| {method} | {mean_std([f['val_ppl'] for f in finals])} | {mean_std([f['val_loss'] for f in finals])}"
            f" | {mean_std(paired) if method != 'plain' and paired else '-'}"
            f" | {statistics.mean(f['tokens_backpropagated'] for f in finals) / 1e6:.3f}"
            f" | {statistics.mean(f['tokens_forwarded'] for f in finals) / 1e6:.3f}"
            f" | {mean_std([f['train_seconds'] for f in finals])} | {mean_std([f['selection_seconds'] for f in finals])} |"
        )
    steps = [c["step"] for c in runs[0]["checkpoints"]]
    lines += ["", "| step | " + " | ".join(f"{m}: val ppl (backprop / forward Mtok)" for m in methods) + " |",
              "| ---: | " + " | ".join("---:" for _ in methods) + " |"]
    for i, step in enumerate(steps):
        cells = []
        for method in methods:
            points = [by[method, s]["checkpoints"][i] for s in seeds if (method, s) in by]
            backprop = statistics.mean(p["tokens_backpropagated"] for p in points) / 1e6
            forward = statistics.mean(p["tokens_forwarded"] for p in points) / 1e6
            cells.append(f"{mean_std([p['val_ppl'] for p in points])} ({backprop:.3f} / {forward:.3f})")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, versions."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["plain", "linupper", "select"], choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=450, help="optimizer steps per run (a multiple of --checkpoints)")
    parser.add_argument("--checkpoints", type=int, default=5, help="validations along the run, the last at the end")
    parser.add_argument("--val-batches", type=int, default=24, help="held-out batches of 16 rows per validation")
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="LossReweighting's warm-up, fraction of --steps")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the 2-core VM is shared: 1 is faster)")
    parser.add_argument("--out", default="/tmp/lm_reweighting.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, before = datetime.now(timezone.utc).isoformat(timespec="seconds"), machine()
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            runs.append(run(method, seed, args))
            final = runs[-1]["checkpoints"][-1]
            print(f"{method:>10} seed {seed}: val ppl {final['val_ppl']:.3f}  train {final['train_seconds']:.0f} s"
                  f"  fit {runs[-1]['fit_seconds']:.0f} s", flush=True)
    report = tables(runs)
    print(report)
    payload = {"command": " ".join([sys.executable, "-m", "benchmarks.lm_reweighting", *(argv or sys.argv[1:])]),
               "started": started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine_before": before, "machine_after": machine(), "args": vars(args), "runs": runs, "tables": report}
    with open(args.out, "w") as handle:
        json.dump(payload, handle, indent=1)
    print(f"raw results: {args.out}")


if __name__ == "__main__":
    main()
