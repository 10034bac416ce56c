"""Simulated peak accelerator memory of full fine-tuning, LoRA, LISA/IST/BAdam (through weightwise) and
memory-saving ingredients, for 1.1B and 7B Llamas - on CPU, with fake tensors.

Every method trains three AdamW steps (batch 4 x 512, fp32 parameters, bf16 autocast; layer-sampling
methods switch layers before step 2, see ``benchmarks.memory.simulate.STEPS``); the peak of each
phase is accounted by kind. The simulator is validated against H100 measurements of full
fine-tuning, LoRA and hand-written LISA (``H100_PEAK_GIB`` in :mod:`benchmarks.memory.report`).

    python -m benchmarks.memory.run                                  # everything (see DEFAULT_METHODS)
    python -m benchmarks.memory.run --models 1.1b --methods full,lora,lisa_hand
    python -m benchmarks.memory.run --methods lisa_layers+bf16frozen+ckpt+fused --out /tmp/mem
    python -m benchmarks.memory.run --methods full,full+dft,full+rho1 --out benchmarks/memory/results/tokens

Method names: a base method (full, lora, lisa_hand, lisa, lisa_layers, ist_lora, badam) with
optional ``+ingredient``s (forloop, fused, ckpt, bf16frozen, linearce; the token paths dft and rho1,
the latter with a 1.1B-class reference model); ``--list`` describes them.
Writes ``results.md``, ``results.json`` and ``peak_memory.png`` (needs matplotlib) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from benchmarks.memory import report
from benchmarks.memory.methods import BASES, DEFAULT_METHODS, INGREDIENTS, Recipe
from benchmarks.memory.models import SHAPES
from benchmarks.memory.simulate import STEPS, Simulation, fake_tensor_support, score_store_bytes, simulate

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--models", default="1.1b,7b", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method names")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for results.md/.json and the chart")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG (no matplotlib needed)")
    parser.add_argument("--list", action="store_true", help="describe the methods and ingredients, and exit")
    args = parser.parse_args(argv)
    for model in args.models.split(","):
        if model not in SHAPES:
            parser.error(f"unknown model {model!r}; choose from {sorted(SHAPES)}")
    for method in args.methods.split(","):
        try:
            Recipe.parse(method)
        except ValueError as error:
            parser.error(str(error))
    return args


def markdown(simulations: list[Simulation], header: str, support: dict[str, str], store: dict[str, int]) -> str:
    """The whole report: validation, methods by kind, the goal, and the per-sample path's notes."""
    parts = [header]
    validation = report.validation_table(simulations)
    if validation:
        parts += ["## Validation against the H100", validation]
    parts += [
        "## Peak memory by kind (GiB; ZeRO columns: analytic, see benchmarks/memory/zero.py)",
        report.method_table(simulations),
    ]
    goal = report.goal_table(simulations)
    if goal:
        parts += ["## Goal: peak <= LoRA r=8 + 10% and <= 35% of full fine-tuning", goal]
    layers = [f"- {s.model} {s.method}: {s.active_layers}" for s in simulations if s.active_layers is not None]
    if layers:
        parts += [f"## Active layers in steps 1-{STEPS}", "\n".join(layers)]
    parts += [
        "## weightwise's per-sample path under fake tensors",
        "\n".join(f"- {name}: {result}" for name, result in support.items()),
        "\n".join(
            f"- SampleScoreStore after one update, real tensors, {n}: {b:,} bytes ({b / 2**20:.2f} MiB)" for n, b in store.items()
        ),
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> list[Simulation]:
    args = parse_args(argv)
    if args.list:
        for name, text in {**BASES, **{f"+{k}": v for k, v in INGREDIENTS.items()}}.items():
            print(f"{name:14s} {text}")
        return []
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations of names peft still calls
    start = time.perf_counter()
    simulations = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            simulations.append(simulate(model, method))
            s = simulations[-1]
            print(
                f"[{time.perf_counter() - start:6.0f} s] {model} {method}: {s.total / report.GIB:.2f} GiB ({s.seconds:.1f} s)",
                file=sys.stderr,
            )
    support = fake_tensor_support()
    store = {f"{n:,} samples, batch 4": score_store_bytes(n, 4) for n in (8, 1_000_000)}
    wall = time.perf_counter() - start
    command = "python -m benchmarks.memory.run " + " ".join(sys.argv[1:] if argv is None else argv)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"# Simulated peak memory\n\n{when}; `{command}`; {wall:.0f} s wall on {platform.machine()} "
        f"({torch.get_num_threads()} threads); torch {torch.__version__}. {STEPS} AdamW steps per method, fake tensors, "
        "bf16 autocast, fp32 parameters; batch and sequence length as in benchmarks/memory/models.py."
    )
    text = markdown(simulations, header, support, store)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    extra = {
        "date": when,
        "command": command,
        "wall_seconds": wall,
        "torch": torch.__version__,
        "fake_tensor_support": support,
        "score_store_bytes": store,
    }
    (args.out / "results.json").write_text(report.to_json(simulations, extra))
    if not args.no_chart:
        report.chart(simulations, args.out / "peak_memory.png")
    return simulations


if __name__ == "__main__":
    main()
