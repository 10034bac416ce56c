"""Small-scale expert-upcycling experiment on real text: does growing E -> 2E mid-training pay off?

A tiny Mixtral (byte-level, vocabulary 256) is trained on Python's own standard-library sources
(real text shipped with every Python) with a plain PyTorch loop - ``weightwise.experts`` is pure
functions, no Lightning needed. Every run sees the same batches in the same order. Runs (``--runs``):

* ``scratch-2E``   2E experts from step 0 for T steps;
* ``continued-E``  E experts for T steps;
* ``upcycled``     E experts for T1 steps, then ``upcycle_experts(factor=2)`` (duplicate, m copies
  each, Adam state copied) and T - T1 more;
* ``upcycled-utility``  the same with copies allocated by :class:`weightwise.experts.ExpertUtility`
  at its defaults (the reference's ``gradient_squared`` ``||g_e||^2`` on the ``gate_up``
  projection, averaged over the last ``--utility-window`` steps before the surgery) and greedy
  allocation with ``--cap`` new copies per expert at most;
* ``upcycled-utility-reset``  as ``upcycled-utility`` with ``optimizer_state="reset"`` (the
  paper's: the upcycled experts' and routers' Adam state starts afresh);
* ``upcycled-utility-0.1``  weightwise 0.1's utility for comparison: ``taylor`` ``sum |W_e * g_e|``
  on both projections, copies in proportion to it (``allocation="proportional"``);
* ``upcycled-granular``  ``method="granular"``: every expert split into 2 experts of half the
  hidden units, top-K -> top-2K (same FLOPs per token, function preserved); the halves' outputs
  are scaled by 2, so their Adam moments are divided by 2 (first) and 4 (second);
* ``upcycled-granular-0.1moments``  the same with the moments weightwise 0.1 produced (multiplied
  by 2 and 4 - emulated here by rescaling the corrected state after the surgery), to measure what
  the moment fix changes.

Top-K stays fixed for duplication, so a step costs the same for E and 2E experts and "compute" is
optimizer steps. Reported: validation loss at the end, the step at which each run first reaches
the scratch-2E run's final loss (its compute to match it), validation loss just before and just
after the surgery, and copies per expert (first MoE block). ``--threads`` is 1 by default: on a
2-core machine shared with other jobs, 2 threads ran steps up to 7x slower. Run (from the repository root):
    .venv/bin/python -m benchmarks.upcycling --steps 400 --upcycle-at 200 --eval-every 25
    .venv/bin/python -m benchmarks.upcycling --steps 1200 --upcycle-at 600 --hidden 96 --eval-every 50
    .venv/bin/python -m benchmarks.upcycling --runs scratch-2E,upcycled-granular
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from weightwise.experts import ExpertUtility, find_moe_blocks, upcycle_experts

RUNS: dict[str, dict] = {
    "scratch-2E": {},
    "continued-E": {},
    "upcycled": {"method": "duplicate", "selection": "uniform"},
    "upcycled-utility": {"method": "duplicate", "selection": "utility"},
    "upcycled-utility-reset": {"method": "duplicate", "selection": "utility", "optimizer_state": "reset"},
    "upcycled-utility-0.1": {
        "method": "duplicate", "selection": "utility", "allocation": "proportional", "metric": "taylor", "projection": "both",
    },
    "upcycled-granular": {"method": "granular"},
    "upcycled-granular-0.1moments": {"method": "granular", "old_moments": True},
}
"""Run name -> ``upcycle_experts`` settings (plus ``metric``/``projection`` for ExpertUtility and
``old_moments`` for the emulation of weightwise 0.1's moment scaling)."""


def corpus(n_bytes: int) -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= n_bytes:
            break
    return torch.tensor(list(b"".join(chunks)[:n_bytes]), dtype=torch.long)


def model_with(num_experts: int, args: argparse.Namespace) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, num_local_experts=num_experts, num_experts_per_tok=args.top_k,
        max_position_embeddings=args.seq, router_aux_loss_coef=0.01, output_router_logits=True,
    )
    torch.manual_seed(args.seed)
    return MixtralForCausalLM(config)


def batch(data: torch.Tensor, gen: torch.Generator, args: argparse.Namespace) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=gen)
    return torch.stack([data[s : s + args.seq] for s in starts])


@torch.no_grad()
def evaluate(model: MixtralForCausalLM, val: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(float(model(input_ids=b, labels=b, output_router_logits=False).loss) for b in val) / len(val)
    model.train()
    return loss


def emulate_old_moments(model: MixtralForCausalLM, optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Turn the corrected state of outputs scaled by ``scale`` (moments / s, / s^2) into weightwise
    0.1's (moments * s, * s^2): multiply first moments by s^2 and second moments by s^4."""
    for block in find_moe_blocks(model).values():
        for param in block.expert_parameters().values():
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.mul_(scale**4 if key.endswith("_sq") else scale**2)


def surgery(name: str, model: MixtralForCausalLM, optimizer: torch.optim.Optimizer, utility: ExpertUtility | None,
            args: argparse.Namespace) -> str:
    """Upcycle ``model`` as run ``name`` says; returns the copies per expert of the first block."""
    settings = dict(RUNS[name])
    old_moments = settings.pop("old_moments", False)
    settings.pop("metric", None)
    settings.pop("projection", None)
    report = upcycle_experts(
        model, 2, **settings, utility=utility.averages if utility else None, cap=args.cap,
        router_noise=args.router_noise if settings["method"] == "duplicate" else 0.0,
        optimizer=optimizer, generator=torch.Generator().manual_seed(0),
    )
    if old_moments:
        emulate_old_moments(model, optimizer, 2.0)
    return str(next(iter(report.copies.values())).tolist())


def run(name: str, args: argparse.Namespace, train: torch.Tensor, val: list[torch.Tensor]) -> dict:
    experts = 2 * args.experts if name == "scratch-2E" else args.experts
    model = model_with(experts, args).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same data order for every run
    settings = RUNS[name]
    utility = None
    if settings.get("selection") == "utility":
        utility = ExpertUtility(
            find_moe_blocks(model), **{k: settings[k] for k in ("metric", "projection") if k in settings}
        )
    curve, start, jump, copies = [], time.perf_counter(), None, "-"
    for step in range(1, args.steps + 1):
        if name.startswith("upcycled") and step == args.upcycle_at + 1:
            before = evaluate(model, val)
            copies = surgery(name, model, optimizer, utility, args)
            jump = (before, evaluate(model, val))
        ids = batch(train, gen, args)
        model(input_ids=ids, labels=ids).loss.backward()
        if utility is not None and args.upcycle_at - args.utility_window < step <= args.upcycle_at:
            utility.accumulate(optimizer)  # the gradients this step's optimizer update applies
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0:
            curve.append((step, evaluate(model, val)))
    return {"curve": curve, "jump": jump, "copies": copies, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--upcycle-at", type=int, default=300)
    parser.add_argument("--utility-window", type=int, default=50, help="steps before the surgery that utility averages")
    parser.add_argument("--cap", type=int, default=3, help="greedy allocation: most new copies per expert")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--router-noise", type=float, default=1e-2, help="duplicate only: relative noise on copies' router rows")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {list(RUNS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 oversubscribe a shared 2-core VM)")
    args = parser.parse_args()
    names = args.runs.split(",")
    if unknown := [n for n in names if n not in RUNS]:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    torch.set_num_threads(args.threads)
    data = corpus(3_000_000)
    split = int(0.95 * data.numel())
    train, held_out = data[:split], data[split:]
    val_gen = torch.Generator().manual_seed(123)
    val = [batch(held_out, val_gen, args) for _ in range(8)]

    results = {}
    for name in names:
        results[name] = run(name, args, train, val)
        r = results[name]
        print(f"{name}: final {r['curve'][-1][1]:.4f}, surgery {r['jump']}, copies {r['copies']}, {r['seconds']:.0f} s", flush=True)
    target = results["scratch-2E"]["curve"][-1][1] if "scratch-2E" in results else None
    print(f"\n{args.experts} -> {2 * args.experts} experts, top-{args.top_k}, {args.steps} steps, upcycle at {args.upcycle_at},"
          f" hidden {args.hidden}, {args.layers} layers, utility window {args.utility_window}, cap {args.cap}, seed {args.seed}")
    print("| run | final val loss | steps to reach scratch-2E's final loss | compute saved | loss before -> after surgery"
          " | copies per expert (block 0) | wall s |")
    print("| --- | ---: | ---: | ---: | --- | --- | ---: |")
    for name, r in results.items():
        reached = next((step for step, loss in r["curve"] if loss <= target), None) if target is not None else None
        saved = f"{100 * (1 - reached / args.steps):.0f}%" if reached else ("not reached" if target is not None else "-")
        jump = f"{r['jump'][0]:.4f} -> {r['jump'][1]:.4f}" if r["jump"] else "-"
        print(f"| {name} | {r['curve'][-1][1]:.4f} | {reached or '-'} | {saved} | {jump} | {r['copies']} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
