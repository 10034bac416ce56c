"""Small-scale expert-upcycling experiment on real text: does growing E -> 2E mid-training pay off?

A tiny Mixtral (byte-level, vocabulary 256) is trained on Python's own standard-library sources
(real text shipped with every Python) with a plain PyTorch loop - ``weightwise.experts`` is pure
functions, no Lightning needed. Top-K is fixed, so every run costs the same per step and
"compute" is simply optimizer steps:

* ``scratch-2E``   2E experts from step 0 for T steps;
* ``continued-E``  E experts for T steps;
* ``upcycled``     E experts for T1 steps, then ``upcycle_experts(factor=2)`` and T - T1 more;
* ``upcycled-utility`` the same with utility-based (|theta * grad|) copy counts.

Reported: validation loss at the end, and the step at which each run first reaches the
scratch-2E run's final loss (its compute to match it). Run:
    .venv/bin/python benchmarks/upcycling.py --steps 600 --upcycle-at 300
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from weightwise.experts import ExpertUtility, find_moe_blocks, upcycle_experts


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


def run(name: str, args: argparse.Namespace, train: torch.Tensor, val: list[torch.Tensor]) -> dict:
    experts = 2 * args.experts if name == "scratch-2E" else args.experts
    model = model_with(experts, args).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same data order for every run
    utility = ExpertUtility(find_moe_blocks(model)) if name == "upcycled-utility" else None
    curve, start, jump = [], time.perf_counter(), None
    for step in range(1, args.steps + 1):
        if name.startswith("upcycled") and step == args.upcycle_at + 1:
            before = evaluate(model, val)
            upcycle_experts(
                model, 2, selection="utility" if utility else "uniform", utility=utility.totals if utility else None,
                router_noise=args.router_noise, optimizer=optimizer, generator=torch.Generator().manual_seed(0),
            )
            jump = (before, evaluate(model, val))
        ids = batch(train, gen, args)
        model(input_ids=ids, labels=ids).loss.backward()
        if utility is not None and args.upcycle_at - args.utility_window < step <= args.upcycle_at:
            utility.accumulate()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0:
            curve.append((step, evaluate(model, val)))
    return {"curve": curve, "jump": jump, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--upcycle-at", type=int, default=300)
    parser.add_argument("--utility-window", type=int, default=50)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--router-noise", type=float, default=1e-2)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = corpus(3_000_000)
    split = int(0.95 * data.numel())
    train, held_out = data[:split], data[split:]
    val_gen = torch.Generator().manual_seed(123)
    val = [batch(held_out, val_gen, args) for _ in range(8)]

    results = {name: run(name, args, train, val) for name in ("scratch-2E", "continued-E", "upcycled", "upcycled-utility")}
    target = results["scratch-2E"]["curve"][-1][1]
    print(f"\n{args.experts} -> {2 * args.experts} experts, top-{args.top_k}, {args.steps} steps, upcycle at {args.upcycle_at},"
          f" hidden {args.hidden}, {args.layers} layers, seed {args.seed}")
    print("| run | final val loss | steps to reach scratch-2E's final loss | compute saved | loss before -> after surgery | wall s |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for name, r in results.items():
        reached = next((step for step, loss in r["curve"] if loss <= target), None)
        saved = f"{100 * (1 - reached / args.steps):.0f}%" if reached else "not reached"
        jump = f"{r['jump'][0]:.4f} -> {r['jump'][1]:.4f}" if r["jump"] else "-"
        print(f"| {name} | {r['curve'][-1][1]:.4f} | {reached or '-'} | {saved} | {jump} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
