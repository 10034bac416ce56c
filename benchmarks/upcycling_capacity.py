"""Upcycling where capacity pays: dense -> MoE and E -> m·E against continuing and from scratch, at equal FLOPs.

The small upcycling benchmark (``benchmarks/upcycling.py``) had no capacity gap: continuing with E
experts beat 2E experts from scratch, so no upcycling could save anything. This one first shows a
gap - the bigger model from scratch beats the small one at the same counted FLOPs - and then
measures upcycling inside it. A byte-level model (vocabulary 256) trains on a corpus read by path
(``--corpus DIR/<domain>/*.txt``, packed into rows by the equal-compute harness; held-out loss on
``--target``); ``--make-corpus OUT`` writes one from text that ships offline (BBC News prose and
Python's standard library, whole documents, no crawl defects: ``benchmarks.equal_compute.corpus``
with only its clean domain). Rows are drawn without repetition while the pool lasts.

Arms (``--arms``), every one a plain PyTorch loop with AdamW:

* ``dense``: a Llama with MLPs of ``--inter`` units (the small model, continued to the budget);
* ``moe-E``: a Mixtral with E experts of the same size, top-K (the small MoE, continued);
* ``moe-mE``: m·E experts, top-K, from scratch (the big model) - K fixed, so a token costs
  about the same in all three (the router's product is the difference, and it is counted);
  experts have I/G units (``--granularity``): with the defaults, top-2 of experts half the MLP's
  size, so a token costs what it costs the dense model. Top-1 is a trap with Mixtral's router: it
  renormalises the top-K weights, so with K = 1 the weight is exactly 1 and the router gets no
  gradient from the language-model loss (only from the load-balancing loss);
* ``dense->moe-mE`` (``copy``, ``drop``, ``granular``): the dense model until ``--upcycle-at`` of
  the budget, then :func:`weightwise.experts.upcycle_dense` into the m·E model (Komatsuzaki et al.,
  ICLR 2023: every expert a copy of the MLP, function preserved; ``drop``: Drop-Upcycling, Nakamura
  et al., ICLR 2025, r = 0.5; ``granular``: He et al. 2024 / Megatron-LM, the MLP split into
  ``--granularity`` G shards, experts of I/G units, exact with top-K a multiple of G), the
  references' fresh optimizer state for experts and routers;
* ``moe-E->moe-mE`` (``dup``, ``util``): E experts, then :func:`weightwise.experts.upcycle_experts`
  by m (duplication, top-K fixed, Adam state copied - the Expert Upcycling reference's defaults;
  ``util``: copies allocated by :class:`weightwise.experts.ExpertUtility` over the last 50 steps).

The scratch and upcycled MoE models have the same config (:func:`weightwise.experts.moe_config` of
the dense one). Compute is counted by :class:`weightwise.compute.ComputeMeter` - every forward and
backward, routers included, attention in eager mode so that its products are counted - and every
run stops after the optimizer step that spends its budget; the learning rate follows
:func:`weightwise.compute.budget_lr_lambda` over the spent fraction (linear warm-up, cosine to
``--final-lr`` of the peak), so every run's schedule ends at its budget. The budget is ``--steps``
steps of the dense model (``benchmarks.equal_compute.harness.flops_per_row``); held-out
evaluations pause the meter. An upcycling run's schedule spans the whole budget (the surgery is
mid-training, as ``DenseUpcycling``/``ExpertUpcycling`` do it), and its FLOPs include the phase
before the surgery.

With ``--fractions 0.5,0.75,1`` each arm also runs at those fractions of the budget (each with its
own schedule; an upcycling run's surgery at ``--upcycle-at`` of its own budget), which gives the
budget curves the equal-compute analysis (``benchmarks.equal_compute.analysis``) interpolates:
per seed, paired, the compute an arm needs to reach a baseline's final loss and its loss at the
baseline's FLOPs, with 95% t-intervals. Run (from the repository root)::

    .venv/bin/python -m benchmarks.upcycling_capacity --make-corpus /tmp/ww_capacity
    .venv/bin/python -m benchmarks.upcycling_capacity --corpus /tmp/ww_capacity/train \\
        --target /tmp/ww_capacity/target --seeds 0,1,2 --out runs/upcycling_capacity
    .venv/bin/python -m benchmarks.upcycling_capacity --smoke --corpus ... --target ...   # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from benchmarks.equal_compute import analysis
from benchmarks.equal_compute.corpus import build
from benchmarks.equal_compute.harness import Rows, flops_per_row, heldout_loss, load_rows, spent_dict
from weightwise.compute import ComputeMeter, Spent, budget_lr_lambda
from weightwise.experts import ExpertUtility, find_moe_blocks, moe_config, upcycle_dense, upcycle_experts
from weightwise.losses import token_cross_entropy


@dataclass(frozen=True)
class Arm:
    """One way to spend the budget: the model it starts as, and the surgery it makes (if any)."""

    start: str  # "dense", "small" (E experts) or "big" (m·E experts)
    surgery: dict[str, Any] = field(default_factory=dict)  # {"dense": method} or {"experts": selection}


ARMS = {
    "dense": Arm("dense"),
    "moe-E": Arm("small"),
    "moe-mE": Arm("big"),
    "dense->moe-mE:copy": Arm("dense", {"dense": "copy"}),
    "dense->moe-mE:drop": Arm("dense", {"dense": "drop"}),
    "dense->moe-mE:granular": Arm("dense", {"dense": "granular"}),
    "moe-E->moe-mE:dup": Arm("small", {"experts": "uniform"}),
    "moe-E->moe-mE:util": Arm("small", {"experts": "utility"}),
}
"""Arm name -> what it trains (see the module docstring)."""

COMPARISONS = {
    "dense->moe-mE:copy": ("dense", "moe-mE"),
    "dense->moe-mE:drop": ("dense", "moe-mE"),
    "dense->moe-mE:granular": ("dense", "moe-mE"),
    "moe-E->moe-mE:dup": ("moe-E", "moe-mE"),
    "moe-E->moe-mE:util": ("moe-E", "moe-mE"),
    "moe-mE": ("dense", "moe-E", "dense->moe-mE:granular", "dense->moe-mE:copy", "moe-E->moe-mE:dup"),
    "moe-E": ("dense",),
}
"""Arm -> the baselines it is compared with: continuing the small model, and the big one from scratch
(the from-scratch rows against the small models are the capacity gap itself; against an upcycled
run, the share of the budget the big model from scratch needs to match what upcycling reached)."""

UTILITY_WINDOW = 50
"""Optimizer steps before the surgery that ``util``'s expert utility averages (the benchmark of issue 11's)."""


class Budget:
    """A FLOP budget and what a run has spent of it (``fraction`` feeds ``budget_lr_lambda``)."""

    def __init__(self, flops: float) -> None:
        self.flops, self.spent = flops, Spent()

    @property
    def fraction(self) -> float:
        return min(1.0, self.spent.flops / self.flops)


def dense_config(args: argparse.Namespace) -> LlamaConfig:
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq)
    config._attn_implementation = "eager"  # FlopCounterMode has no formula for the CPU SDPA kernel (harness docstring)
    return config


def eager(model: nn.Module) -> nn.Module:
    """``model`` with eager attention and eager experts, so that ``FlopCounterMode`` sees their products:
    transformers' default ``grouped_mm`` experts run an operator it has no formula for (the experts'
    FLOPs would count zero)."""
    model.config._attn_implementation = "eager"
    model.config._experts_implementation = "eager"
    return model


def build_model(start: str, seed: int, args: argparse.Namespace) -> nn.Module:
    """The model an arm starts as, initialised from ``seed`` (the MoE models: ``moe_config`` of the dense config)."""
    torch.manual_seed(seed)
    if start == "dense":
        return LlamaForCausalLM(dense_config(args))
    experts = args.experts if start == "small" else args.experts * args.factor
    return eager(MixtralForCausalLM(moe_config(dense_config(args), experts, args.top_k, args.granularity)))


def training_loss(model: nn.Module, batch: dict[str, torch.Tensor], aux: float) -> torch.Tensor:
    """Mean next-byte loss over the batch's target bytes, plus ``aux`` x the router's load-balancing loss (MoE)."""
    moe = isinstance(model, MixtralForCausalLM)
    kwargs = {"output_router_logits": True} if moe else {}
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **kwargs)
    tokens, mask = token_cross_entropy(out.logits, batch["labels"], shift=True)
    loss = (tokens * mask).sum() / mask.sum()
    return loss + aux * out.aux_loss if moe else loss


class Batches:
    """Batches of ``pool``'s rows in one seeded permutation, a new one each pass (``passes`` counts them)."""

    def __init__(self, pool: Rows, batch_size: int, seed: int) -> None:
        self.rows, self.batch_size, self.gen = pool.rows, batch_size, torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.passes = 0

    def next(self) -> dict[str, torch.Tensor]:
        if len(self.order) < self.batch_size:
            self.order = torch.randperm(len(self.rows), generator=self.gen).tolist()
            self.passes += 1
        chosen, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return {key: torch.stack([self.rows[i][key] for i in chosen]) for key in ("input_ids", "position_ids", "labels")}


def surgery(arm: Arm, model: nn.Module, optimizer: torch.optim.Optimizer, utility: ExpertUtility | None,
            args: argparse.Namespace) -> tuple[nn.Module, str]:
    """Upcycle ``model`` as ``arm`` says; returns the model to train on and a note (copies per expert, block 0)."""
    generator = torch.Generator().manual_seed(0)
    if "dense" in arm.surgery:
        granularity = args.granularity if arm.surgery["dense"] == "granular" else None
        moe = upcycle_dense(model, args.experts * args.factor, args.top_k, method=arm.surgery["dense"], granularity=granularity,
                            optimizer=optimizer, generator=generator)
        return eager(moe), moe.upcycle_report.method
    report = upcycle_experts(model, args.factor, method="duplicate", selection=arm.surgery["experts"],
                             utility=utility.averages if utility else None, router_noise=args.router_noise,
                             optimizer=optimizer, generator=generator)
    return model, str(next(iter(report.copies.values())).tolist())


def evaluate(model: nn.Module, target: Rows, meter: ComputeMeter) -> float:
    meter.paused = True  # evaluations are measurements, not spending
    try:
        return heldout_loss(model, target)
    finally:
        meter.paused = False


def run(name: str, seed: int, fraction: float, budget_flops: float, pool: Rows, target: Rows,
        args: argparse.Namespace) -> dict[str, Any]:
    """Train arm ``name`` to ``fraction`` of the budget; returns its record (``analysis``'s run format)."""
    arm = ARMS[name]
    model = build_model(arm.start, seed, args).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    budget = Budget(fraction * budget_flops)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, budget_lr_lambda(budget, "cosine", warmup_fraction=args.warmup, final_lr_fraction=args.final_lr))
    batches = Batches(pool, args.batch, seed + 1)  # the same rows in the same order for every arm of a seed
    utility = ExpertUtility(find_moe_blocks(model)) if arm.surgery.get("experts") == "utility" else None
    checkpoints = [budget.flops * (k + 1) / args.evals for k in range(args.evals - 1)]
    meter, before = ComputeMeter(model), Spent()
    meter.install()
    points, jump, note, step, step_flops, start = [], None, "-", 0, 0.0, time.perf_counter()
    pending_surgery = bool(arm.surgery)
    try:
        while budget.spent.flops < budget.flops:
            if pending_surgery and budget.fraction >= args.upcycle_at:
                pending_surgery = False
                loss_before = evaluate(model, target, meter)
                meter.uninstall()
                before = before + meter.take()
                model, note = surgery(arm, model, optimizer, utility, args)
                meter = ComputeMeter(model)
                meter.install()
                jump = {"step": step, "before": loss_before, "after": evaluate(model, target, meter)}
            loss = training_loss(model, batches.next(), args.aux)
            with meter.backward():
                loss.backward()
            # a live graph keeps each parameter's gradient accumulator, whose shape a surgery would contradict
            del loss
            if pending_surgery and utility is not None and budget.fraction + UTILITY_WINDOW * step_flops / budget.flops >= args.upcycle_at:
                utility.accumulate(optimizer)  # the last UTILITY_WINDOW steps before the surgery
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_flops = before.flops + meter.spent.flops - budget.spent.flops
            budget.spent = before + meter.spent
            schedule.step()
            while checkpoints and budget.spent.flops >= checkpoints[0]:
                checkpoints.pop(0)
                points.append(point(budget, step, evaluate(model, target, meter), start))
        points.append(point(budget, step, evaluate(model, target, meter), start))
    finally:
        meter.uninstall()
    return {"method": name, "seed": seed, "fraction": fraction, "budget_flops": budget.flops, "points": points, "spent": spent_dict(budget.spent),
            "steps": step, "passes": batches.passes, "fit_seconds": time.perf_counter() - start, "jump": jump, "copies": note}


def point(budget: Budget, step: int, loss: float, start: float) -> dict[str, float]:
    return {"flops": float(budget.spent.flops), "step": step, "heldout_loss": loss, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- analysis
def comparisons(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown tables: each arm against each of its baselines (``COMPARISONS``), paired by seed, with
    ``analysis.summarize`` (the baseline plays its ``plain``)."""
    present = {r["method"] for r in runs}
    out = []
    for baseline in dict.fromkeys(b for bs in COMPARISONS.values() for b in bs):
        arms = [a for a, bs in COMPARISONS.items() if baseline in bs and a in present]
        if baseline not in present or not arms:
            continue
        chosen = [{**r, "method": "plain" if r["method"] == baseline else r["method"]} for r in runs
                  if r["method"] in (baseline, *arms)]
        rows = analysis.summarize(chosen)
        plain_flops = next(r["points"][-1]["flops"] for r in chosen if r["method"] == "plain" and r["fraction"] == 1.0)
        lines = analysis.table(rows, None, plain_flops).replace("plain", baseline).split("\n")
        curves = {r["method"] for r in chosen if r["fraction"] < 1.0}
        for i, row in enumerate(rows, start=2):  # one budget: no curve to read the compute off (see along_the_run)
            if row["method"] not in curves and row["method"] != "plain":
                cells = lines[i].split(" | ")
                lines[i] = " | ".join([*cells[:4], "- (one budget)", *cells[5:]])
        text = "\n".join(lines)
        out.append(f"### against {baseline}\n\n{text}")
    return "\n\n".join(out)


def along_the_run(runs: Sequence[dict[str, Any]]) -> str:
    """Per arm and baseline, paired by seed: the FLOPs at which the arm's main-budget run first reaches
    the baseline's final loss, read off its own held-out checkpoints (log-linear between them), as a
    share of the baseline's FLOPs. The checkpoints lie before the run's schedule has annealed: not a
    bound - a run with a budget ending there may be lower (annealed) or higher (at this scale a short
    budget's earlier decay slowed it: moe-mE at half the budget ended at 1.93, its full-budget run's
    checkpoint there was at 1.77). The budget curves (``--curve-arms``) are the measurement."""
    main = {(r["method"], r["seed"]): r for r in runs if r["fraction"] == 1.0}
    lines = ["| arm | baseline | compute to reach the baseline's final loss along the run, % of its FLOPs (per seed) | mean (95% CI) |",
             "| --- | --- | --- | ---: |"]
    for arm, baselines in COMPARISONS.items():
        for baseline in baselines:
            seeds = sorted(s for (m, s) in main if m == arm and (baseline, s) in main)
            if not seeds:
                continue
            ratios = []
            for seed in seeds:
                base = main[baseline, seed]["points"][-1]
                points = [(p["flops"], p["heldout_loss"]) for p in main[arm, seed]["points"]]
                reached, _ = analysis.flops_to_reach(points, base["heldout_loss"])
                ratios.append(reached / base["flops"] if reached <= points[-1][0] else math.inf)
            cells = ", ".join("not reached" if math.isinf(r) else f"{100 * r:.0f}%" for r in ratios)
            mean, half = analysis.interval(ratios) if not any(math.isinf(r) for r in ratios) else (math.inf, math.nan)
            mean = "-" if math.isinf(mean) else f"{100 * mean:.1f}%" + ("" if math.isnan(half) else f" ± {100 * half:.1f}")
            lines.append(f"| {arm} | {baseline} | {cells} | {mean} |")
    return "\n".join(lines)


def jumps(runs: Sequence[dict[str, Any]]) -> str:
    """The held-out loss just before and after each surgery (mean over seeds, main budget), and the copies."""
    lines = ["| arm | loss before -> after the surgery (mean) | change, per seed | copies per expert, block 0 |", "| --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["method"] for r in runs if r["jump"] and r["fraction"] == 1.0):
        mine = [r for r in runs if r["method"] == name and r["fraction"] == 1.0]
        before = sum(r["jump"]["before"] for r in mine) / len(mine)
        after = sum(r["jump"]["after"] for r in mine) / len(mine)
        changes = ", ".join(f"{r['jump']['after'] - r['jump']['before']:+.4f}" for r in mine)
        lines.append(f"| {name} | {before:.4f} -> {after:.4f} | {changes} | {' / '.join(r['copies'] for r in mine)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point
def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-corpus", metavar="OUT", help="write the built-in corpus (BBC News + stdlib, whole documents) and exit")
    parser.add_argument("--pool-bytes", type=int, default=8_800_000, help="--make-corpus: training pool bytes")
    parser.add_argument("--corpus", help="training pool: DIR/<domain>/*.txt")
    parser.add_argument("--from-runs", metavar="JSONL", nargs="+", help="no training: report the runs.jsonl files of earlier invocations")
    parser.add_argument("--target", help="held-out text: DIR/<domain>/*.txt")
    parser.add_argument("--eval-rows", type=int, default=384, help="held-out rows evaluated (the first ones)")
    parser.add_argument("--arms", default="dense,moe-E,moe-mE,dense->moe-mE:granular,moe-E->moe-mE:dup", help=f"of {list(ARMS)}")
    parser.add_argument("--curve-arms", default="", help="arms that also run at --fractions below 1 (budget curves)")
    parser.add_argument("--fractions", default="1", help="the budget fractions --curve-arms run at, e.g. 0.5,0.75,1 (leave 1 out when the main runs exist)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=1500, help="the budget: this many steps of the dense model")
    parser.add_argument("--upcycle-at", type=float, default=0.5, help="surgery when this fraction of a run's budget is spent")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--inter", type=int, default=128, help="MLP / expert intermediate units")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4, help="E, the small MoE's experts")
    parser.add_argument("--factor", type=int, default=2, help="m: the big MoE has m·E experts")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--granularity", type=int, default=2, help="G: experts of --inter/G units (dense->moe-mE:granular needs G > 1)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up, fraction of the budget")
    parser.add_argument("--final-lr", type=float, default=0.1, help="end of the cosine, fraction of --lr")
    parser.add_argument("--aux", type=float, default=0.01, help="load-balancing loss coefficient (MoE)")
    parser.add_argument("--router-noise", type=float, default=1e-2, help="moe-E->moe-mE: relative noise on the copies' router rows")
    parser.add_argument("--evals", type=int, default=8, help="held-out evaluations per run (the last at the budget)")
    parser.add_argument("--out", help="folder for runs.jsonl, results.md and a plot")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 oversubscribe a shared 2-core VM)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and budget: seconds, for tests")
    args = parser.parse_args(argv)
    if args.make_corpus is None and args.from_runs is None and (args.corpus is None or args.target is None):
        parser.error("give --corpus DIR and --target DIR (e.g. from --make-corpus OUT: OUT/train and OUT/target)")
    if unknown := [a for a in (args.arms + "," + args.curve_arms).split(",") if a and a not in ARMS]:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    dense_arms = {a for a in (args.arms + "," + args.curve_arms).split(",") if a.startswith("dense->") and not args.from_runs}
    if args.granularity > 1 and dense_arms - {"dense->moe-mE:granular"}:
        parser.error("dense->moe-mE:copy and :drop make experts of the dense MLP's size: give --granularity 1")
    if args.granularity == 1 and "dense->moe-mE:granular" in dense_arms:
        parser.error("dense->moe-mE:granular splits the MLP into G shards: give --granularity G > 1 (experts of --inter/G units)")
    if not 0.0 < args.upcycle_at < 1.0:
        parser.error(f"--upcycle-at must be in (0, 1), got {args.upcycle_at}")
    if args.smoke:
        args.hidden, args.inter, args.layers, args.seq, args.batch, args.steps, args.evals, args.eval_rows = 16, 32, 1, 32, 4, 8, 2, 16
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    if args.make_corpus:
        shares = {"clean": 1.0, "duplicates": 0.0, "boilerplate": 0.0, "junk": 0.0, "fragments": 0.0}
        counts = build(args.make_corpus, pool_bytes=args.pool_bytes, target_bytes=100_000, reference_bytes=0,
                       max_doc_bytes=1 << 30, shares=shares)
        print({split: {d: n for d, n in domains.items() if n} for split, domains in counts.items()})
        return []
    if args.from_runs:
        runs = [json.loads(line) for path in args.from_runs for line in Path(path).read_text().splitlines() if line.strip()]
        report(runs, args, Path(args.out) if args.out else None)
        return runs
    torch.set_num_threads(args.threads)
    pool, target = load_rows(args.corpus, args.seq), load_rows(args.target, args.seq)
    target = Rows(target.rows[: args.eval_rows], target.domains, target.domain_of_row[: args.eval_rows])
    forward, backward = flops_per_row(LlamaForCausalLM(dense_config(args)), args.seq)
    budget_flops = float(args.steps * args.batch * (forward + backward))
    arms, curve_arms = args.arms.split(","), [a for a in args.curve_arms.split(",") if a]
    fractions = sorted({float(f) for f in args.fractions.split(",")})  # a curve arm runs at exactly these
    plan = [(name, seed, f) for seed in (int(s) for s in args.seeds.split(",")) for name in arms
            for f in (fractions if name in curve_arms else [1.0])]
    print(f"pool {len(pool.rows)} rows of {args.seq} bytes ({len(pool.rows) * args.seq / 1e6:.1f} MB), budget {budget_flops:.3g} FLOPs"
          f" = {args.steps} dense steps of {args.batch} rows ({args.steps * args.batch / len(pool.rows):.2f} passes)", flush=True)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    runs = []
    for name, seed, fraction in plan:
        record = run(name, seed, fraction, budget_flops, pool, target, args)
        runs.append(record)
        jump = f", surgery {record['jump']['before']:.4f} -> {record['jump']['after']:.4f}" if record["jump"] else ""
        print(f"{name} seed {seed} x{fraction}: {record['points'][-1]['heldout_loss']:.4f} at {record['spent']['flops']:.3g} FLOPs,"
              f" {record['steps']} steps{jump}, {record['fit_seconds']:.0f} s", flush=True)
        if out:
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
    report(runs, args, out)
    return runs


def report(runs: Sequence[dict[str, Any]], args: argparse.Namespace, out: Path | None) -> None:
    config = (f"hidden {args.hidden}, inter {args.inter} (experts {args.inter // args.granularity}), {args.layers} layers, E={args.experts} -> {args.experts * args.factor}, top-{args.top_k},"
              f" {args.steps} dense steps x {args.batch} x {args.seq} bytes, lr {args.lr}, upcycle at {args.upcycle_at}")
    finals = ["| arm | final held-out loss per seed (main budget) | steps |", "| --- | --- | ---: |"]
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name and r["fraction"] == 1.0]
        if not mine:
            continue
        losses = ", ".join(f"{r['points'][-1]['heldout_loss']:.4f}" for r in mine)
        finals.append(f"| {name} | {losses} | {mine[0]['steps']} |")
    text = "\n\n".join([config, "\n".join(finals), jumps(runs), comparisons(runs), along_the_run(runs)])
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(text + "\n")
        if "moe-mE" in {r["method"] for r in runs}:
            analysis.plot(runs, out / "loss_vs_flops.png", "held-out loss at equal FLOPs: upcycling against continuing and from scratch")


if __name__ == "__main__":
    main()
