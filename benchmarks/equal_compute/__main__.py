"""Sample-level methods at equal compute on a miniature pre-training corpus.

    .venv/bin/python -m benchmarks.equal_compute --demo            # 4 methods, 1 seed, W&B offline: ~1 CPU-minute
    .venv/bin/python -m benchmarks.equal_compute --seeds 3         # the default method set, 3 seeds
    .venv/bin/python -m benchmarks.equal_compute --corpus DIR/train --target DIR/target --reference DIR/reference \\
        --methods plain dsir linupper:r=1 select rho perplexity:band=medium infobatch dsir+linupper
    .venv/bin/python -m benchmarks.equal_compute --methods plain dft rho1 mix:natural mix:uniform mix:odm mix:doremi mix:ado

Without ``--corpus`` the built-in corpus (``benchmarks.equal_compute.corpus``: BBC News prose and
Python sources mixed with crawl-like duplicates, boilerplate, junk and fragments) is built into
``--out``. Any corpus in the same layout works: one folder per domain of ``.txt`` files (one
document per file, or per line with ``--unit line``); nothing reads the domain names.

Tokens are bytes (vocabulary 256: no tokenizer is fitted to the training corpus, so every method
and corpus sees the same units). Each domain's documents are packed into rows of ``--seq-len``
bytes. The model is a byte-level Llama from scratch (transformers; ``--hidden 64 --layers 2``:
115k parameters), trained through a Lightning ``Trainer`` with the weightwise callbacks, AdamW,
linear warm-up and cosine decay over the *budget fraction spent*.

Equal compute: the main budget is ``--budget-steps`` steps of plain training (or ``--budget``
FLOPs); every method - and plain training - runs at each of ``--fractions`` of it, each run
stopping at its budget with its schedule ending there (plain training at 0.5 takes half the steps).
Each run evaluates the held-out loss on the target at ``--checkpoints`` FLOP marks along the way and
at its end. Results, tables and the plot go to ``--out`` (``results.json``, ``table.md``,
``loss_vs_flops.png``, and ``mixing_weights.png`` for mixing methods); ``--resume`` skips the runs ``results.json`` already holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl
import torch

from benchmarks.equal_compute import analysis, corpus, methods
from benchmarks.equal_compute.harness import ModelSize, Rows, Setup, build_model, flops_per_row, load_rows, train
from weightwise.callbacks import ComputeBudget

DEFAULT_METHODS = ["plain", "dsir", "select", "linupper", "rho", "perplexity:band=medium", "perplexity", "quadratic", "extremes",
                   "linupper:r=1", "linupper:warmup=0.3", "dsir+linupper", "dsir+select", "dsir:fraction=0.3"]
"""The main table. InfoBatch is not in it: under one pass over the pool (the default budget is half a
pass) its first, unscored epoch never ends and it trains exactly as plain; RESULTS.md runs it on a
24 KB pool (4.1 passes)."""
DEMO_METHODS = ["plain", "dsir", "linupper", "select"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help="training pool: DIR/<domain>/*.txt (default: build the built-in corpus into --out)")
    parser.add_argument("--target", help="held-out clean target, same layout (required with --corpus)")
    parser.add_argument("--reference", help="clean held-in text for reference models and DSIR, same layout")
    parser.add_argument("--unit", choices=["file", "line"], default="file", help="one document per file or per line")
    parser.add_argument("--methods", nargs="+", default=None, help=f"method specs (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    parser.add_argument("--from-results", nargs="+", default=None, metavar="JSON",
                        help="train nothing: report the runs of these results.json files (e.g. seeds run in parallel)")
    parser.add_argument("--budget-steps", type=int, default=100, help="main budget: this many steps of plain training")
    parser.add_argument("--budget", type=float, default=None, help="main budget in FLOPs (overrides --budget-steps)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.75, 1.0], help="budgets, fractions of the main one")
    parser.add_argument("--checkpoints", type=int, default=8, help="held-out evaluations per main budget")
    parser.add_argument("--eval-rows", type=int, default=96, help="target rows evaluated (a fixed subset; 0: all)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=float, default=0.05, help="LR warm-up, fraction of the budget")
    parser.add_argument("--final-lr", type=float, default=0.1, help="LR at the budget, fraction of the peak")
    parser.add_argument("--reference-steps", type=int, default=150, help="training steps of the reference model")
    parser.add_argument("--reference-hidden", type=int, default=32, help="the reference model's width (RHO-LOSS: a small model)")
    parser.add_argument("--reference-layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default="runs/equal_compute")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in OUT/results.json")
    parser.add_argument("--wandb", action="store_true", help="log every run to W&B (offline) with FLOPs as the x-axis")
    parser.add_argument("--demo", action="store_true", help=f"the demo: {' '.join(DEMO_METHODS)}, 1 seed, W&B offline")
    args = parser.parse_args(argv)
    if args.demo:
        args.methods = args.methods or DEMO_METHODS
        args.seeds, args.wandb = 1, True
    args.methods = args.methods or DEFAULT_METHODS
    if (args.corpus is None) != (args.target is None):
        parser.error("--corpus and --target go together")
    if 1.0 not in args.fractions:
        parser.error("--fractions must include 1.0 (the main budget every figure is measured at)")
    for spec in args.methods:
        methods.parse(spec)  # a bad spec fails now, not after an hour of runs
    if "plain" not in args.methods:
        parser.error("--methods must include plain: every figure is measured against it")
    return args


def machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                   if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core VM, {cpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


class Benchmark:
    """Loads the data once, trains the reference model on demand, runs (method, seed, fraction)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.corpus is None:
            corpus.build(out / "corpus")
            args.corpus, args.target, args.reference = (str(out / "corpus" / s) for s in corpus.SPLITS)
        self.pool = load_rows(args.corpus, args.seq_len, args.unit)
        target = load_rows(args.target, args.seq_len, args.unit)
        if args.eval_rows and len(target.rows) > args.eval_rows:
            keep = sorted(torch.randperm(len(target.rows), generator=torch.Generator().manual_seed(0))[: args.eval_rows].tolist())
            target = Rows([target.rows[i] for i in keep], target.domains, [target.domain_of_row[i] for i in keep])
        self.target = target
        self.reference = load_rows(args.reference, args.seq_len, args.unit) if args.reference else None
        self.size = ModelSize(args.hidden, args.layers)
        forward, backward = flops_per_row(build_model(self.size), args.seq_len)
        self.step_flops = (forward + backward) * args.batch_size
        self.main_budget = args.budget or self.step_flops * args.budget_steps
        self._reference_model: torch.nn.Module | None = None
        self.reference_run: dict[str, Any] | None = None

    def reference_model(self) -> torch.nn.Module:
        """The reference model (``--reference-hidden``/``--reference-layers``): plain training on the
        reference set, ``--reference-steps`` steps, once per invocation (seed 10,000), shared by every run."""
        if self._reference_model is None:
            assert self.reference is not None
            pl.seed_everything(10_000, verbose=False)
            model = build_model(ModelSize(self.args.reference_hidden, self.args.reference_layers))
            forward, backward = flops_per_row(model, self.args.seq_len)
            budget = ComputeBudget(flops=(forward + backward) * self.args.batch_size * self.args.reference_steps, wandb_x_axis=False)
            self.reference_run = train(Setup(), model=model, budget=budget, pool=self.reference, target=self.target, seed=10_000,
                                       batch_size=self.args.batch_size, lr=self.args.lr, warmup=self.args.warmup,
                                       final_lr=self.args.final_lr, checkpoints=[], max_steps=self.args.reference_steps + 1)
            self._reference_model = model
        return self._reference_model

    def run(self, spec: str, seed: int, fraction: float) -> dict[str, Any]:
        args = self.args
        budget = self.main_budget * fraction
        compute = ComputeBudget(flops=budget, wandb_x_axis=False)  # W&B's axis: self.logger defines it
        plain_steps = math.ceil(budget / self.step_flops)
        pl.seed_everything(seed, verbose=False)
        model = build_model(self.size)  # the same initialisation for every method of a seed
        ctx = methods.Context(self.pool, self.reference, seed, compute, args.seq_len, args.batch_size, plain_steps, self.reference_model)
        setup = methods.build(spec, ctx)
        log, finish = self.logger(spec, seed, fraction)
        checkpoints = [self.main_budget * (i + 1) / args.checkpoints for i in range(args.checkpoints)]
        pl.seed_everything(seed, verbose=False)
        try:
            result = train(setup, model=model, budget=compute, pool=self.pool, target=self.target, seed=seed,
                           batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, final_lr=args.final_lr,
                           checkpoints=checkpoints, max_steps=4 * plain_steps + 10, log=log)
        finally:
            finish()
        return {"method": spec, "seed": seed, "fraction": fraction, "budget": budget, **result}

    def logger(self, spec: str, seed: int, fraction: float):  # noqa: ANN201 - (log, finish)
        if not self.args.wandb:
            return None, lambda: None
        import wandb

        run = wandb.init(mode="offline", project="weightwise-equal-compute", group=spec, name=f"{spec} seed {seed} x{fraction}",
                         dir=self.args.out, reinit="create_new", config={"method": spec, "seed": seed, "fraction": fraction},
                         settings=wandb.Settings(silent=True))
        run.define_metric("weightwise/flops")
        run.define_metric("*", step_metric="weightwise/flops")
        log = lambda point: run.log({"weightwise/flops": point["flops"], "heldout_loss": point["heldout_loss"],  # noqa: E731
                                     "weightwise/forward_flops": point["forward_flops"], "weightwise/backward_flops": point["backward_flops"]})
        return log, run.finish


def report(bench: Benchmark, runs: list[dict[str, Any]], argv: list[str], started: str) -> str:
    args = bench.args
    rows = analysis.summarize(runs)
    plain_flops = bench.main_budget
    reference_flops = bench.reference_run["spent"]["flops"] if bench.reference_run else None
    shares = bench.pool.share_by_domain()
    text = [
        f"Command: `{' '.join(['.venv/bin/python -m benchmarks.equal_compute', *argv])}`",
        f"Machine: {machine()}; started {started}, finished {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
        f"Pool: {len(bench.pool.rows)} rows of {args.seq_len} bytes ({', '.join(f'{d} {100 * s:.0f}%' for d, s in shares.items())});"
        f" target {len(bench.target.rows)} rows. Model: byte Llama hidden {args.hidden}, {args.layers} layers."
        f" Main budget {bench.main_budget:.3g} FLOPs (= {bench.main_budget / bench.step_flops:.0f} plain steps of"
        f" {args.batch_size} rows, {bench.main_budget / bench.step_flops * args.batch_size / len(bench.pool.rows):.1f} passes over the pool);"
        f" budgets {', '.join(f'{f:g}' for f in args.fractions)} of it; seeds {sorted({r['seed'] for r in runs})}.",
        "",
        analysis.table(rows, reference_flops, plain_flops),
        "",
        "Rows backpropagated per domain at the main budget:",
        "",
        analysis.domain_table(runs),
    ]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    bench = Benchmark(args)
    path = Path(args.out) / "results.json"
    runs: list[dict[str, Any]] = json.loads(path.read_text())["runs"] if args.resume and path.exists() else []
    if args.from_results:
        loaded = [json.loads(Path(p).read_text()) for p in args.from_results]
        runs = [r for payload in loaded for r in payload["runs"] if r["method"] in args.methods]
        bench.reference_run = next((p["reference_run"] for p in loaded if p["reference_run"]), None)
    done = {(r["method"], r["seed"], r["fraction"]) for r in runs}
    clock = time.perf_counter()
    for seed in [] if args.from_results else range(args.first_seed, args.first_seed + args.seeds):
        for spec in args.methods:  # method by method: an interrupted run leaves whole budget curves
            for fraction in sorted(args.fractions):
                if (spec, seed, fraction) in done:
                    continue
                runs.append(bench.run(spec, seed, fraction))
                final = runs[-1]["points"][-1]
                print(f"{spec:>28} seed {seed} x{fraction:<5} loss {final['heldout_loss']:.4f}  {final['flops']:.3g} FLOPs"
                      f"  {runs[-1]['steps']} steps  {runs[-1]['fit_seconds']:.0f} s  (total {time.perf_counter() - clock:.0f} s)", flush=True)
                path.write_text(json.dumps({"args": vars(args), "reference_run": bench.reference_run, "runs": runs}))
    path.write_text(json.dumps({"args": vars(args), "reference_run": bench.reference_run, "runs": runs}))
    text = report(bench, runs, argv, started)
    (Path(args.out) / "table.md").write_text(text + "\n")
    analysis.plot(runs, Path(args.out) / "loss_vs_flops.png",
                  f"held-out loss vs FLOPs, {len({r['seed'] for r in runs})} seed(s); markers: runs with budgets {args.fractions} of the main one")
    if analysis.plot_mixing(runs, Path(args.out) / "mixing_weights.png", seed=min(r["seed"] for r in runs)):
        print(f"mixing weights: {Path(args.out) / 'mixing_weights.png'}")
    print(text)
    print(f"\nplot: {Path(args.out) / 'loss_vs_flops.png'}; raw: {path}")


if __name__ == "__main__":
    main()
