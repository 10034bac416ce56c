"""Tables, JSON and the chart of a set of simulations."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.memory.simulate import Simulation
from benchmarks.memory.tracking import KINDS
from benchmarks.memory.zero import per_rank

GIB = 2**30
ZERO_RANKS = 8
# Measured on an H100 (torch 2.11, plain PyTorch, torch.cuda.max_memory_allocated): the 1.1B model,
# batch 4 x 512, fp32 parameters under bf16 autocast, AdamW, two steps. GiB.
H100_PEAK_GIB = {"full": 20.55, "lora": 9.67, "lisa_hand": 11.16}
VALIDATION_TOLERANCE = 0.10
# The team's goal for layerwise sampling: peak <= LoRA r=8's peak + 10%, and <= 35% of full fine-tuning's.
GOAL_LORA_MARGIN, GOAL_FULL_FRACTION = 1.10, 0.35
LABELS = {
    "parameters": "params",
    "gradients": "grads",
    "optimizer_state": "opt state",
    "optimizer_temporaries": "opt temp",
    "activations": "activations",
    "backward_temporaries": "bw temp",
}


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def _by_model(simulations: Sequence[Simulation]) -> dict[str, dict[str, Simulation]]:
    out: dict[str, dict[str, Simulation]] = {}
    for s in simulations:
        out.setdefault(s.model, {})[s.method] = s
    return out


def validation_table(simulations: Sequence[Simulation]) -> str:
    """Simulated peak vs the H100 measurement, for the methods measured there (1.1B only)."""
    sims = _by_model(simulations).get("1.1b", {})
    rows = ["| method (1.1B) | simulated GiB | H100 GiB | error | within 10% |", "| --- | ---: | ---: | ---: | :---: |"]
    for method, measured in H100_PEAK_GIB.items():
        if method in sims:
            error = sims[method].total / GIB / measured - 1
            ok = "yes" if abs(error) <= VALIDATION_TOLERANCE else "**no**"
            rows.append(f"| {method} | {gib(sims[method].total)} | {measured:.2f} | {error:+.1%} | {ok} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def method_table(simulations: Sequence[Simulation]) -> str:
    """Peak by kind per model and method, with the analytic ZeRO per-rank estimates."""
    head = ["model", "method", "trainable (M)", *(f"{LABELS[k]} GiB" for k in KINDS), "peak GiB", "% of full", "peak phase"]
    head += [f"ZeRO-{i} x{ZERO_RANKS} GiB/rank" for i in (1, 2, 3)]
    align = ["---", "---", *["---:"] * (len(KINDS) + 3), "---", *["---:"] * 3]
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for model, sims in _by_model(simulations).items():
        full = sims.get("full")
        for method, s in sims.items():
            zero = per_rank(s, ZERO_RANKS)
            share = f"{s.total / full.total:.0%}" if full is not None else "-"
            cells = [
                model,
                method,
                f"{max(s.trainable) / 1e6:.1f}",
                *(gib(s.peak[k]) for k in KINDS),
                f"**{gib(s.total)}**",
                share,
                s.peak_phase,
            ]
            cells += [gib(zero[f"zero{i}"]) for i in (1, 2, 3)]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def goal_table(simulations: Sequence[Simulation]) -> str:
    """Each LISA/IST/BAdam/LoRA variant against the goal (peak <= LoRA + 10% and <= 35% of full)."""
    rows = [
        "| model | method | peak GiB | vs LoRA r=8 | % of full | <= LoRA + 10% | <= 35% of full |",
        "| --- | --- | ---: | ---: | ---: | :---: | :---: |",
    ]
    for model, sims in _by_model(simulations).items():
        lora, full = sims.get("lora"), sims.get("full")
        if lora is None or full is None:
            continue
        for method, s in sims.items():
            if method == "full":
                continue
            meets_lora = s.total <= GOAL_LORA_MARGIN * lora.total
            meets_full = s.total <= GOAL_FULL_FRACTION * full.total
            rows.append(
                f"| {model} | {method} | {gib(s.total)} | {s.total / lora.total - 1:+.0%} | {s.total / full.total:.0%} |"
                f" {'yes' if meets_lora else 'no'} | {'yes' if meets_full else 'no'} |"
            )
    return "\n".join(rows) if len(rows) > 2 else ""


def to_json(simulations: Sequence[Simulation], extra: dict[str, Any]) -> str:
    return json.dumps(
        {
            **extra,
            "units": "bytes",
            "h100_peak_gib": H100_PEAK_GIB,
            "simulations": [{**s.to_json(), f"zero_x{ZERO_RANKS}_per_rank": per_rank(s, ZERO_RANKS)} for s in simulations],
        },
        indent=1,
    )


def chart(simulations: Sequence[Simulation], path: Path) -> None:
    """A stacked horizontal bar per method (one panel per model): peak memory by kind, GiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _by_model(simulations)
    height = max(len(sims) for sims in models.values())
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 1.2 + 0.38 * height), squeeze=False)
    colours = dict(zip(KINDS, ("#4c72b0", "#dd8452", "#55a868", "#8fd19e", "#c44e52", "#e6a0a2")))
    for ax, (model, sims) in zip(axes[0], models.items()):
        names = list(sims)[::-1]
        left = [0.0] * len(names)
        for kind in KINDS:
            values = [sims[n].peak[kind] / GIB for n in names]
            ax.barh(names, values, left=left, color=colours[kind], label=LABELS[kind])
            left = [a + b for a, b in zip(left, values)]
        for y, total in enumerate(left):
            ax.text(total, y, f" {total:.1f}", va="center", fontsize=8)
        if "lora" in sims and "full" in sims:  # the goal's two limits
            ax.axvline(
                GOAL_LORA_MARGIN * sims["lora"].total / GIB, color="black", linestyle="--", linewidth=0.8, label="LoRA + 10%"
            )
            ax.axvline(
                GOAL_FULL_FRACTION * sims["full"].total / GIB, color="black", linestyle=":", linewidth=0.8, label="35% of full"
            )
        ax.set_title(f"{model}: simulated peak memory by kind")
        ax.set_xlabel("GiB")
        ax.set_xlim(0, max(left) * 1.12)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
