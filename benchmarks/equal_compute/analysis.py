"""Equal-compute figures from a set of runs: interpolation on budget curves, paired intervals, tables, plot.

A method's *budget curve* is the (FLOPs, final held-out loss) of its runs at each budget - every
run with its own schedule ending at its budget. Per seed, paired with plain training of the same
seed (same initialisation, same data order where the method keeps it):

* **compute to plain's loss**: the FLOPs at which the method's budget curve reaches plain's final
  loss at the main budget (linear in log-FLOPs between the two budgets around it; beyond the
  measured budgets the end segment is extended and the figure is marked ``*`` - an extrapolation;
  ratios above ``RATIO_CAP`` count as the cap and are marked ``≥``), as a share of plain's FLOPs;
* **loss at plain's FLOPs**: the method's curve at plain's main-budget FLOPs, minus plain's loss.

Means over seeds with 95% t-intervals (``scipy.stats.t``; ``n - 1`` degrees of freedom).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scipy import stats

RATIO_CAP = 2.0
"""Compute ratios above this (far outside the measured budgets) are counted as this, and flagged."""

GROUPS = {"train": ("model",), "selection": ("selection_forward", "scoring", "probes", "no_grad_forward"), "reference": ("reference_model",)}
"""ComputeBudget's sources, grouped for the table: the trained model's forwards with gradients and
backwards; its forwards without gradients; reference models' forwards."""


def curve(runs: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(FLOPs, final held-out loss) of each run, sorted by FLOPs."""
    return sorted((r["points"][-1]["flops"], r["points"][-1]["heldout_loss"]) for r in runs)


def _segment(points: Sequence[tuple[float, float]], i: int, x: float) -> float:
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    if x1 <= x0:  # two runs that spent the same FLOPs (a budget spent before training): their mean
        return (y0 + y1) / 2
    t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return y0 + t * (y1 - y0)


def loss_at(points: Sequence[tuple[float, float]], flops: float) -> float:
    """The curve's loss at ``flops`` (linear in log-FLOPs; end segments extended)."""
    if len(points) == 1:
        return points[0][1]
    i = next((k for k in range(len(points) - 1) if flops <= points[k + 1][0]), len(points) - 2)
    return _segment(points, i, flops)


def flops_to_reach(points: Sequence[tuple[float, float]], level: float) -> tuple[float, bool]:
    """(FLOPs at which the curve first reaches ``level``, whether that is an extrapolation).

    Inside the measured budgets: the first segment whose end is at or below ``level``. Outside:
    the nearest end segment extended (``inf`` when it does not descend)."""
    if len(points) == 1:
        return (points[0][0], False) if points[0][1] <= level else (math.inf, True)
    for i, (_, y) in enumerate(points):
        if y <= level:
            if i == 0:
                return _solve(points, 0, level), points[0][1] < level
            return _solve(points, i - 1, level), False
    return _solve(points, len(points) - 2, level), True


def _solve(points: Sequence[tuple[float, float]], i: int, level: float) -> float:
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    if y1 >= y0 or x1 <= x0:
        return math.inf if level < min(y0, y1) else x0
    t = (level - y0) / (y1 - y0)
    return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))


def interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width nan for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def fmt(mean: float, half: float, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    if not math.isfinite(mean):
        return "not reached"
    if math.isnan(half):
        return f"{mean * scale:+.{digits}f}{unit}"
    return f"{mean * scale:+.{digits}f} ± {half * scale:.{digits}f}{unit}"


def summarize(runs: Sequence[dict[str, Any]], main: float = 1.0) -> list[dict[str, Any]]:
    """One row per method: the equal-compute figures against ``plain`` (paired by seed)."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    if "plain" not in methods:
        raise ValueError("the runs hold no 'plain' method: the baseline of every comparison")
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["method"], r["seed"], r["fraction"]): r for r in runs}
    rows = []
    for method in methods:
        ratios, deltas, finals, extrapolated, shares, seconds = [], [], [], False, [], []
        for seed in seeds:
            mine = [r for r in runs if r["method"] == method and r["seed"] == seed]
            base = by.get(("plain", seed, main))
            if not mine or base is None or (method, seed, main) not in by:
                continue
            points = curve(mine)
            plain_flops, plain_loss = base["points"][-1]["flops"], base["points"][-1]["heldout_loss"]
            flops, extra = flops_to_reach(points, plain_loss)
            extrapolated |= extra
            ratios.append(flops / plain_flops)
            deltas.append(loss_at(points, plain_flops) - plain_loss)
            finals.append(by[method, seed, main]["points"][-1]["heldout_loss"])
            spent = by[method, seed, main]["spent"]
            shares.append({group: sum(spent["by_source"].get(s, 0) for s in sources) / spent["flops"] for group, sources in GROUPS.items()})
            seconds.append(by[method, seed, main]["fit_seconds"])
        if not ratios:
            continue
        capped = [min(r, RATIO_CAP) for r in ratios]
        ratio = interval(capped)
        rows.append({
            "method": method, "seeds": len(ratios), "final_loss": statistics.fmean(finals), "delta_loss": interval(deltas),
            "compute_ratio": ratio, "capped": any(r > RATIO_CAP for r in ratios), "ratios": ratios, "deltas": deltas, "extrapolated": extrapolated,
            "shares": {s: statistics.fmean(x.get(s, 0.0) for x in shares) for s in {k for x in shares for k in x}},
            "fit_seconds": statistics.fmean(seconds),
        })
    return rows


def table(rows: Sequence[dict[str, Any]], reference_flops: float | None, plain_flops: float) -> str:
    """The equal-compute table (markdown)."""
    lines = [
        "| method | seeds | held-out loss at main budget | Δ loss at plain's FLOPs (95% CI) | compute to reach plain's final loss, % of plain (95% CI) | FLOPs: train / selection / reference | fit s |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in rows:
        ratio_mean, ratio_half = row["compute_ratio"]
        ratio = ("≥ " if row["capped"] else "") + f"{100 * ratio_mean:.1f}%" + (
            "" if math.isnan(ratio_half) else f" ± {100 * ratio_half:.1f}") + ("*" if row["extrapolated"] else "")
        shares = row["shares"]
        split = " / ".join(f"{100 * shares.get(s, 0.0):.0f}%" for s in ("train", "selection", "reference"))
        lines.append(f"| {row['method']} | {row['seeds']} | {row['final_loss']:.4f} | "
                     f"{'-' if row['method'] == 'plain' else fmt(*row['delta_loss'])} | "
                     f"{'100%' if row['method'] == 'plain' else ratio} | {split} | {row['fit_seconds']:.0f} |")
    notes = ["", "`*`: at least one seed's figure lies outside the measured budgets (end segment extended);"
             f" `≥`: at least one seed does not reach plain's loss by {RATIO_CAP:.0%} of plain's FLOPs on the extended curve"
             f" (its ratio counted as {RATIO_CAP:.0%}, so the mean is a lower bound)."]
    if reference_flops:
        notes.append(f"Reference model training (clean held-in set; amortised over every run that uses it, not in the"
                     f" run columns): {reference_flops:.3g} FLOPs = {100 * reference_flops / plain_flops:.1f}% of plain's main budget.")
    return "\n".join(lines + notes)


def domain_table(runs: Sequence[dict[str, Any]], main: float = 1.0) -> str:
    """Share of backpropagated rows per domain, per method, at the main budget (mean over seeds)."""
    chosen = [r for r in runs if r["fraction"] == main]
    if not chosen:
        return ""
    domains = list(dict.fromkeys(d for r in chosen for d in r["domain_rows"]))  # runs on other pools may lack some
    lines = ["| method | " + " | ".join(domains) + " |", "| --- | " + " | ".join("---:" for _ in domains) + " |"]
    for method in dict.fromkeys(r["method"] for r in chosen):
        mine = [r["domain_rows"] for r in chosen if r["method"] == method]
        cells = []
        for d in domains:
            cells.append(f"{100 * statistics.fmean(m.get(d, 0) / max(1, sum(m.values())) for m in mine):.0f}%")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    """Held-out loss against FLOPs: each method's budget curve (markers: the runs' final points,
    mean over seeds) and, thin, the main-budget run's checkpoints along the way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    main = max(r["fraction"] for r in runs)
    for k, method in enumerate(dict.fromkeys(r["method"] for r in runs)):
        color = plt.cm.tab20(k % 20)
        fractions = sorted({r["fraction"] for r in runs if r["method"] == method})
        xs, ys = [], []
        for fraction in fractions:
            finals = [r["points"][-1] for r in runs if r["method"] == method and r["fraction"] == fraction]
            xs.append(statistics.fmean(p["flops"] for p in finals))
            ys.append(statistics.fmean(p["heldout_loss"] for p in finals))
        style = {"lw": 2.5, "color": "black"} if method == "plain" else {"lw": 1.5, "color": color}
        ax.plot(xs, ys, marker="o", label=method, **style)
        along = [r["points"] for r in runs if r["method"] == method and r["fraction"] == main]
        n = min((len(p) for p in along), default=0)  # 0: the main-budget run is missing (an interrupted benchmark)
        ax.plot([statistics.fmean(p[i]["flops"] for p in along) for i in range(n)],
                [statistics.fmean(p[i]["heldout_loss"] for p in along) for i in range(n)], lw=0.7, alpha=0.5, color=style["color"])
    plain_losses = [r["points"][-1]["heldout_loss"] for r in runs if r["method"] == "plain"]
    if plain_losses:  # the region where the budget curves cross plain's: far-off methods leave the frame
        ax.set_ylim(min(r["points"][-1]["heldout_loss"] for r in runs) - 0.05, max(plain_losses) + 0.35)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs (forward + backward, every pass a method spends)")
    ax.set_ylabel("held-out loss on the clean target (nats / byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mixing(runs: Sequence[dict[str, Any]], path: str | Path, seed: int = 0, main: float = 1.0) -> bool:
    """Each mixing method's domain weights against FLOPs (one panel per method; its ``seed`` run at
    the ``main`` budget; the weights a run draws by after each step). False, and no file, when no
    such run records weights."""
    chosen = [r for r in runs if r.get("domain_weights") and r["seed"] == seed and r["fraction"] == main]
    if not chosen:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3.6), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], chosen, strict=True):
        xs = [w["flops"] for w in run["domain_weights"]]
        for d, name in enumerate(run["domain_names"]):
            ax.plot(xs, [w["weights"][d] for w in run["domain_weights"]], label=name, lw=1.5)
        ax.set_title(f"{run['method']} (seed {seed})", fontsize=9)
        ax.set_xlabel("FLOPs")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("domain weight (the mixture drawn next)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
