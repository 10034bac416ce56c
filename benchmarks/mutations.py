"""Does the test suite catch plausible one-line mistakes in the core math? A mutation harness.

Usage (from the repository root)::

    python -m benchmarks.mutations                      # every mutant, one at a time
    python -m benchmarks.mutations --only infobatch-le,lisa-seed
    python -m benchmarks.mutations --capability layers --json /tmp/layers.json
    python -m benchmarks.mutations --check              # only verify every snippet is found exactly once
    python -m benchmarks.mutations --quick --only ...   # the selections' `make quick` part only (-m "not slow")
    python -m benchmarks.mutations --list

Each mutant is one plausible mistake - an off-by-one, a swapped operand, a wrong power, ``<`` for
``<=``, a dropped term - written against the real code of ``src/weightwise``. For every mutant the
harness

1. copies the working tree as it is now (``src/``, ``tests/``, ``pyproject.toml``; uncommitted work
   included, ``.venv`` and caches excluded) to ``/tmp/weightwise-mutants/<id>/``;
2. applies the mutation there (the original snippet must occur exactly once, else it stops loudly);
3. runs the mutant's test selection with ``.venv/bin/python -m pytest -x -q`` in the copy, with
   ``PYTHONPATH=<copy>/src:<copy>`` so that the copy's ``weightwise`` shadows the installed
   (editable) one - checked once per run by importing it, and by the ``sanity`` mutant
   (``loss_weights`` returning ones), which must be caught or the run stops;
4. records caught / survived / timeout and the first test that failed.

Before the mutants an unmutated copy runs the union of all selections (the baseline): tests that
fail there (other engineers' work in progress) are deselected for every mutant and listed.

It never writes to ``src/`` or ``tests/`` of the repository. Output: a markdown table and totals per
capability on stdout, and a JSON file (``--json``, default ``/tmp/weightwise-mutations.json``).
Mutants marked ``equivalent`` provably do not change behaviour; they are listed with the reason
and not run (``--run-equivalent`` runs them anyway, to show they survive).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
WORK = Path("/tmp/weightwise-mutants")
DEFAULT_JSON = Path("/tmp/weightwise-mutations.json")
COPIED = ("src", "tests", "pyproject.toml")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info", ".venv")

# ---------------------------------------------------------------------------------------- selections
# The quick selections: the unit tests of the capability (new tests/*/test_mistakes.py files are
# picked up with their folder), the resume contract where state is involved, and the 2-process
# DDP tests only where the mistake can only show with two ranks.
CONTRACTS = "tests/test_contracts.py"
DDP = "tests/distributed/test_ddp.py"
WEIGHTING = ("tests/weighting",)
WEIGHTING_STATEFUL = ("tests/weighting", CONTRACTS)
REDUCER = ("tests/weighting", "tests/core")
DISTRIBUTED = ("tests/weighting", "tests/core", DDP)
SELECTION = ("tests/selection", CONTRACTS)
DSIR = ("tests/selection",)
LAYERS = ("tests/layers", CONTRACTS)
EXPERTS = ("tests/experts", CONTRACTS)
CORE = ("tests/core", "tests/weighting", CONTRACTS)


@dataclass(frozen=True)
class Mutant:
    """One planted mistake.

    Attributes:
        id: short name (also the copy's folder).
        capability: weighting, reducer, selection, dsir, layers, experts, core, data or reporting.
        file: path under ``src/weightwise``.
        original: exact snippet of the current code (must occur exactly once).
        mutated: what it becomes.
        description: the mistake, in words.
        tests: the pytest selection (paths relative to the repository root).
        equivalent: why the mutant provably cannot change behaviour (then it is not run), else ``None``.
        origin: ``"issue"`` for the five the harness's issue named, ``"issue23"`` for the four
            issue 23 named, ``"sanity"`` for the harness check, else ``"new"``.
    """

    id: str
    capability: str
    file: str
    original: str
    mutated: str
    description: str
    tests: tuple[str, ...]
    equivalent: str | None = None
    origin: str = "new"


SANITY = Mutant(
    "sanity",
    "weighting",
    "weighting/reweighting.py",
    "        return (torch.softmax(scores / temperature, dim=0) * losses.numel()).to(losses.dtype)",
    "        return torch.ones_like(losses)",
    "harness check: loss_weights returns all ones (must be caught, else the copy does not shadow the install)",
    WEIGHTING,
    origin="sanity",
)

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ the five the issue named
    Mutant(
        "reducer-local-denominator",
        "reducer",
        "weighting/reducer.py",
        "denominator = global_losses.numel() / world",
        "denominator = losses.numel()",
        "the reducer divides by the local batch instead of the global batch over the ranks",
        DISTRIBUTED,
        origin="issue",
    ),
    Mutant(
        "infobatch-le",
        "selection",
        "selection/infobatch.py",
        "well_learned = scores < torch.nanmean(scores)",
        "well_learned = scores <= torch.nanmean(scores)",
        "InfoBatch's well-learned test `<` becomes `<=`",
        SELECTION,
        origin="issue",
    ),
    Mutant(
        "lisa-seed",
        "layers",
        "layers/policies.py",
        "torch.randperm(len(self.candidates), generator=self.generator(period))",
        "torch.randperm(len(self.candidates), generator=torch.Generator().manual_seed(period))",
        "LISA ignores its seed (draws from the period alone)",
        LAYERS,
        origin="issue",
    ),
    Mutant(
        "upcycle-second-moment-power",
        "experts",
        "experts/surgery.py",
        '                power = 2 if key.endswith("_sq") else 1',
        "                power = 1",
        "after upcycling, Adam's second moments are scaled by 1/s instead of 1/s^2",
        EXPERTS,
        origin="issue",
    ),
    Mutant(
        "store-ema-swapped",
        "core",
        "core/store.py",
        "decay * previous + (1.0 - decay) * losses",
        "(1.0 - decay) * previous + decay * losses",
        "the score store's EMA swaps decay and 1 - decay",
        CORE,
        origin="issue",
    ),
    # ------------------------------------------------------------------ weighting: functional core
    Mutant(
        "normalize-sign",
        "weighting",
        "weighting/reweighting.py",
        "return delta * (2.0 * losses - high - low) / (high - low).clamp(min=MIN_SPREAD)",
        "return delta * (2.0 * losses - high + low) / (high - low).clamp(min=MIN_SPREAD)",
        "normalisation to [-delta, delta] adds the batch minimum instead of subtracting it",
        WEIGHTING,
    ),
    Mutant(
        "normalize-ignores-window",
        "weighting",
        "weighting/reweighting.py",
        "low, high = reference.min(), reference.max()",
        "low, high = losses.min(), losses.max()",
        "the window statistic: the range is taken over the batch, not the window",
        WEIGHTING,
    ),
    Mutant(
        "linupper-clamp-min",
        "weighting",
        "weighting/reweighting.py",
        "return torch.clamp(normalized + delta, max=delta)",
        "return torch.clamp(normalized + delta, min=delta)",
        "linupper clamps from below instead of above",
        WEIGHTING,
    ),
    Mutant(
        "quadratic-delta-power",
        "weighting",
        "weighting/reweighting.py",
        "return 1.0 - normalized.square() / delta**2",
        "return 1.0 - normalized.square() / delta",
        "quadratic divides by delta instead of delta^2",
        WEIGHTING,
    ),
    Mutant(
        "extremes-no-abs",
        "weighting",
        "weighting/reweighting.py",
        "return normalized.abs()",
        "return normalized",
        "extremes forgets the absolute value (only the hardest samples are up-weighted)",
        WEIGHTING,
    ),
    Mutant(
        "upper-sign",
        "weighting",
        "weighting/reweighting.py",
        "return 0.5 * normalized + 0.5 * delta",
        "return -0.5 * normalized + 0.5 * delta",
        "upper's slope has the wrong sign (down-weights hard samples)",
        WEIGHTING,
    ),
    Mutant(
        "upper-offset",
        "weighting",
        "weighting/reweighting.py",
        "return 0.5 * normalized + 0.5 * delta",
        "return 0.5 * normalized - 0.5 * delta",
        "upper's constant offset has the wrong sign",
        WEIGHTING,
        equivalent="adds the same constant (-delta) to every score; softmax (batch) and exp(s - top) / mean exp(window - top)"
        " (window) are both invariant to a common shift, so every weight is unchanged",
    ),
    Mutant(
        "temperature-multiplies",
        "weighting",
        "weighting/reweighting.py",
        "return (torch.softmax(scores / temperature, dim=0) * losses.numel()).to(losses.dtype)",
        "return (torch.softmax(scores * temperature, dim=0) * losses.numel()).to(losses.dtype)",
        "the softmax multiplies by the temperature instead of dividing",
        WEIGHTING,
    ),
    Mutant(
        "weights-mean-off-by-one",
        "weighting",
        "weighting/reweighting.py",
        "return (torch.softmax(scores / temperature, dim=0) * losses.numel()).to(losses.dtype)",
        "return (torch.softmax(scores / temperature, dim=0) * (losses.numel() - 1)).to(losses.dtype)",
        "softmax scaled by B - 1 instead of B (weights no longer mean 1)",
        WEIGHTING,
    ),
    Mutant(
        "window-normaliser-sum",
        "weighting",
        "weighting/reweighting.py",
        "torch.exp(window_scores - top).mean()",
        "torch.exp(window_scores - top).sum()",
        "window statistic: the softmax normaliser sums over the window instead of averaging",
        WEIGHTING,
    ),
    Mutant(
        "window-keeps-oldest",
        "weighting",
        "weighting/callback.py",
        "self._recent = recent[-self.window :]",
        "self._recent = recent[: self.window]",
        "the loss window keeps the oldest samples instead of the latest",
        WEIGHTING_STATEFUL,
    ),
    Mutant(
        "warmup-le",
        "weighting",
        "weighting/callback.py",
        "if trainer.global_step < self.warmup_steps:",
        "if trainer.global_step <= self.warmup_steps:",
        "the warm-up lasts one optimizer step too long (`<` becomes `<=`)",
        WEIGHTING_STATEFUL,
    ),
    Mutant(
        "warmup-temperature-ignored",
        "weighting",
        "weighting/callback.py",
        "temperature = self.warmup_temperature",
        "temperature = self.temperature",
        "a temperature warm-up weights at the run's temperature instead of warmup_temperature",
        WEIGHTING_STATEFUL,
    ),
    Mutant(
        "token-shares-rank-no-R",
        "weighting",
        "weighting/losses.py",
        "return tokens * (tokens.numel() / num_ranks) / per_rank_tokens[index].clamp(min=1.0)",
        "return tokens * tokens.numel() / per_rank_tokens[index].clamp(min=1.0)",
        'token_weighting="rank" forgets to divide the batch size by the number of ranks',
        WEIGHTING,
    ),
    Mutant(
        "token-shares-global-no-B",
        "weighting",
        "weighting/losses.py",
        "return tokens * tokens.numel() / tokens.sum().clamp(min=1.0)",
        "return tokens / tokens.sum().clamp(min=1.0)",
        'token_weighting="global" gives shares summing to 1 instead of mean 1',
        WEIGHTING,
    ),
    Mutant(
        "token-mean-over-T",
        "weighting",
        "weighting/losses.py",
        "return sums / counts.to(sums.dtype), counts",
        "return sums / mask.shape[1], counts",
        "a sequence's loss is divided by the padded length instead of its valid tokens",
        WEIGHTING,
    ),
    Mutant(
        "sequence-loss-batch-count",
        "weighting",
        "weighting/losses.py",
        "return (token_losses * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)",
        "return (token_losses * valid).sum(dim=1) / valid.sum().clamp(min=1.0)",
        "sequence_loss divides by the batch's valid tokens instead of the row's",
        WEIGHTING,
    ),
    Mutant(
        "weighted-mean-denominator",
        "weighting",
        "weighting/losses.py",
        "return weighted.sum() / denominator",
        "return weighted.sum() / losses.numel()",
        "weighted_mean ignores the denominator it is given",
        WEIGHTING,
    ),
    # ------------------------------------------------------------------ the reducer and collectives
    Mutant(
        "reducer-product-overwrites",
        "reducer",
        "weighting/reducer.py",
        "weights = factor if weights is None else weights * factor",
        "weights = factor",
        "the combined weight is the last callback's factor, not the product of all",
        REDUCER + (CONTRACTS,),
    ),
    Mutant(
        "reducer-inf-not-dropped",
        "reducer",
        "weighting/reducer.py",
        "finite = torch.isfinite(global_losses)",
        "finite = ~torch.isnan(global_losses)",
        "the non-finite check catches nan but not inf",
        REDUCER,
    ),
    Mutant(
        "reducer-drop-slice-start",
        "reducer",
        "weighting/reducer.py",
        "local = slice(int(finite[: local.start].sum()), int(finite[: local.stop].sum()))",
        "local = slice(local.start, local.start + int(local_finite.sum()))",
        "after dropping non-finite samples, the local slice does not move back by earlier ranks' drops",
        DISTRIBUTED,
    ),
    Mutant(
        "reducer-rank0-weights",
        "reducer",
        "weighting/reducer.py",
        "weighted_mean(losses, weights[local], denominator=denominator)",
        "weighted_mean(losses, weights[: losses.numel()], denominator=denominator)",
        "every rank applies the first B_local weights of the global batch (rank 0's) to its own samples",
        DISTRIBUTED,
    ),
    Mutant(
        "gather-keeps-padding",
        "core",
        "core/collectives.py",
        "gathered.append(torch.cat([buf[:size] for buf, size in zip(buffers, sizes)]))",
        "gathered.append(torch.cat(buffers))",
        "all_gather_variable keeps the padding of shorter ranks",
        DISTRIBUTED,
    ),
    Mutant(
        "gather-slice-off-by-one",
        "core",
        "core/collectives.py",
        "start = sum(sizes[: rank()])",
        "start = sum(sizes[: rank() + 1])",
        "all_gather_variable's local slice starts after this rank's own samples",
        DISTRIBUTED,
    ),
    # ------------------------------------------------------------------ core: the score store
    Mutant(
        "store-dedup-first",
        "core",
        "core/store.py",
        'scatter_reduce(0, inverse, positions, reduce="amax")',
        'scatter_reduce(0, inverse, positions, reduce="amin")',
        "a repeated id keeps its first occurrence instead of its last",
        CORE,
    ),
    Mutant(
        "store-ema-from-zero",
        "core",
        "core/store.py",
        "torch.where(torch.isnan(previous), losses, decay * previous",
        "torch.where(torch.isnan(previous), (1.0 - decay) * losses, decay * previous",
        "the EMA starts from zero instead of the first loss",
        CORE,
    ),
    # ------------------------------------------------------------------ selection
    Mutant(
        "infobatch-keep-swapped",
        "selection",
        "selection/infobatch.py",
        "self.keep_ratio = min(1.0, max(MIN_KEEP_RATIO, 1.0 - prune_ratio))",
        "self.keep_ratio = min(1.0, max(MIN_KEEP_RATIO, prune_ratio))",
        "InfoBatch keeps prune_ratio of the well-learned samples instead of 1 - prune_ratio",
        SELECTION,
    ),
    Mutant(
        "infobatch-anneal-lt",
        "selection",
        "selection/infobatch.py",
        "return epoch + 1 <= self.anneal * self.num_epochs",
        "return epoch < self.anneal * self.num_epochs",
        "InfoBatch's annealing test `epoch + 1 <= anneal * num_epochs` becomes `epoch < anneal * num_epochs`",
        SELECTION,
    ),
    Mutant(
        "infobatch-realised-factor",
        "selection",
        "selection/infobatch.py",
        "factor = n_candidates / (n_candidates - n_pruned)",
        "factor = n_candidates / n_pruned",
        "InfoBatch's realised rescale divides by the pruned instead of the kept count",
        SELECTION,
    ),
    Mutant(
        "infobatch-nominal-factor",
        "selection",
        "selection/infobatch.py",
        "factor = 1.0 / self.keep_ratio",
        "factor = 1.0 / self.prune_ratio",
        "InfoBatch's nominal rescale is 1/r instead of 1/(1 - r)",
        SELECTION,
    ),
    Mutant(
        "infobatch-prunes-one-fewer",
        "selection",
        "selection/infobatch.py",
        "dtype=order.dtype) <= n_pruned",
        "dtype=order.dtype) < n_pruned",
        "InfoBatch prunes one well-learned sample fewer than it counts",
        SELECTION,
    ),
    Mutant(
        "rs2-divmod-size",
        "selection",
        "selection/random_subsets.py",
        "round_index, offset = divmod(position, n)",
        "round_index, offset = divmod(position, size)",
        "RS2 walks its permutations in subset-sized instead of dataset-sized rounds",
        SELECTION,
    ),
    Mutant(
        "rs2-same-permutation",
        "selection",
        "selection/random_subsets.py",
        "manual_seed(self.seed * 7919 + round_index)",
        "manual_seed(self.seed * 7919)",
        "RS2 reuses one permutation for every pass over the data",
        SELECTION,
    ),
    Mutant(
        "importance-floor-not-per-sample",
        "selection",
        "selection/importance.py",
        "return (1.0 - self.uniform_mix) * proportional + self.uniform_mix / n",
        "return (1.0 - self.uniform_mix) * proportional + self.uniform_mix",
        "importance sampling's uniform floor is eps instead of eps / N",
        SELECTION,
    ),
    Mutant(
        "importance-weight-no-N",
        "selection",
        "selection/importance.py",
        "return EpochPlan(indices, 1.0 / (self.num_samples * p))",
        "return EpochPlan(indices, 1.0 / p)",
        "importance sampling's unbiasing weight is 1/p instead of 1/(N p)",
        SELECTION,
    ),
    Mutant(
        "importance-unseen-min",
        "selection",
        "selection/importance.py",
        "scores = torch.where(seen, scores, scores[seen].max())",
        "scores = torch.where(seen, scores, scores[seen].min())",
        "importance sampling gives unscored samples the smallest known score instead of the largest",
        SELECTION,
    ),
    Mutant(
        "datadiet-skip-not-offset",
        "selection",
        "selection/score_pruning.py",
        "return rank_range(scores, skip, skip + keep)",
        "return rank_range(scores, skip, keep)",
        "Data Diet's skip_hardest shortens the kept range instead of shifting it",
        SELECTION,
    ),
    Mutant(
        "ranking-tie-off-by-one",
        "selection",
        "selection/ranking.py",
        "ranks = (keys > boundary).sum() + torch.cumsum(equal, 0) - 1",
        "ranks = (keys > boundary).sum() + torch.cumsum(equal, 0)",
        "rank_range ranks tied scores one place too low",
        SELECTION,
    ),
    Mutant(
        "averager-ema-swapped",
        "selection",
        "selection/scoring.py",
        "self.alpha * values + (1 - self.alpha) * previous",
        "self.alpha * previous + (1 - self.alpha) * values",
        "the scoring passes' EMA weights the old average by alpha instead of the new pass",
        SELECTION,
    ),
    Mutant(
        "averager-last-k-roll",
        "selection",
        "selection/scoring.py",
        "history = torch.roll(history, -1, dims=0)",
        "history = torch.roll(history, 1, dims=0)",
        "last-k averaging rolls its history the wrong way",
        SELECTION,
        equivalent="rolling by +1 and overwriting the last row keeps the rows [x(n-1), x(n-2), ..., x(n-k+1), x(n)] after"
        " pass n - the same k passes as rolling by -1 ([x(n-k+1), ..., x(n)]), in another row order; the average is a mean"
        " over rows (order-free) and each sample's column follows the same rule, so every average is unchanged",
    ),
    Mutant(
        "shard-global-rank",
        "selection",
        "selection/base.py",
        "return indices[self.rank :: replicas]",
        "return indices[collectives.rank() :: replicas]",
        "EpochSampler shards by the process' rank, ignoring the rank it was given",
        SELECTION,
    ),
    Mutant(
        "shard-padding-count",
        "selection",
        "selection/base.py",
        "indices = torch.cat([indices, indices[: replicas - remainder]])",
        "indices = torch.cat([indices, indices[:remainder]])",
        "EpochSampler pads a plan with `remainder` samples instead of `replicas - remainder`",
        SELECTION,
    ),
    Mutant(
        "sampler-len-floor",
        "selection",
        "selection/base.py",
        "return -(-self.plan.indices.numel() // self.num_replicas)",
        "return self.plan.indices.numel() // self.num_replicas",
        "EpochSampler's length rounds down instead of up",
        SELECTION,
    ),
    Mutant(
        "subset-size-floor",
        "selection",
        "selection/base.py",
        "max(replicas, replicas * round(fraction * self.num_samples / replicas))",
        "max(replicas, replicas * int(fraction * self.num_samples / replicas))",
        "subset_size rounds fraction * N down instead of to the nearest multiple of the world size",
        SELECTION,
    ),
    Mutant(
        "online-exponent",
        "selection",
        "selection/online.py",
        "probs = percentile ** (1.0 / keep - 1.0)",
        "probs = percentile ** (1.0 / keep)",
        "online batch selection's rank exponent is 1/keep instead of Composer's 1/keep - 1",
        SELECTION,
    ),
    Mutant(
        "online-reducible-sign",
        "selection",
        "selection/online.py",
        "scores = scores - self.reference_loss(batch).detach().float().to(scores.device)",
        "scores = self.reference_loss(batch).detach().float().to(scores.device) - scores",
        "RHO-LOSS's reducible loss is reference minus training loss",
        SELECTION,
    ),
    Mutant(
        "online-window-end",
        "selection",
        "selection/online.py",
        "in_window = first <= trainer.global_step < last",
        "in_window = first <= trainer.global_step <= last",
        "online batch selection stays active one step past the end of its window",
        SELECTION,
    ),
    # ------------------------------------------------------------------ DSIR
    Mutant(
        "dsir-log-ratio-swapped",
        "dsir",
        "selection/dsir.py",
        "log_diff = np.log(target_probs + LOG_EPSILON) - np.log(raw_probs + LOG_EPSILON)",
        "log_diff = np.log(raw_probs + LOG_EPSILON) - np.log(target_probs + LOG_EPSILON)",
        "DSIR's log importance ratio is raw over target",
        DSIR,
    ),
    Mutant(
        "dsir-gumbel-sign",
        "dsir",
        "selection/dsir.py",
        "keys -= torch.log(-torch.log(uniform.clamp_min_(torch.finfo(torch.float64).tiny)))",
        "keys += torch.log(-torch.log(uniform.clamp_min_(torch.finfo(torch.float64).tiny)))",
        "Gumbel-top-k adds negated Gumbel noise (a reflected Gumbel: not sampling proportional to the weights)",
        DSIR,
    ),
    Mutant(
        "dsir-ineligible-zero",
        "dsir",
        "selection/dsir.py",
        "keys[~allowed] = -torch.inf",
        "keys[~allowed] = 0.0",
        "ineligible documents get key 0 instead of -inf (they can still be chosen)",
        DSIR,
    ),
    Mutant(
        "dsir-factors-sum-one",
        "dsir",
        "selection/dsir.py",
        "log_scale = math.log(m) - torch.logsumexp(chosen, 0)",
        "log_scale = -torch.logsumexp(chosen, 0)",
        "DSIR's importance factors sum to 1 instead of having mean 1",
        DSIR,
    ),
    # ------------------------------------------------------------------ layers
    Mutant(
        "ist-update-sign",
        "layers",
        "layers/policies.py",
        "update[index] += self.learning_rate * (reward - baseline) * slope[index]",
        "update[index] += self.learning_rate * (baseline - reward) * slope[index]",
        "IST's REINFORCE update has the wrong sign",
        LAYERS,
    ),
    Mutant(
        "ist-no-baseline",
        "layers",
        "layers/policies.py",
        "baseline = rewards.mean()",
        "baseline = rewards.min()",
        "IST's baseline is the smallest reward instead of the mean",
        LAYERS,
    ),
    Mutant(
        "ist-slope",
        "layers",
        "layers/policies.py",
        "slope = p * (1 - p)",
        "slope = 1 - p",
        "IST's update uses 1 - p instead of the sigmoid's derivative p (1 - p)",
        LAYERS,
    ),
    Mutant(
        "ist-draw-sign",
        "layers",
        "layers/policies.py",
        "probs = torch.sigmoid(-self.scores[self.candidates])",
        "probs = torch.sigmoid(self.scores[self.candidates])",
        "IST draws layers by sigmoid(s) instead of sigmoid(-s) (the un-importance read as importance)",
        LAYERS,
    ),
    Mutant(
        "ist-probe-sign",
        "layers",
        "layers/policies.py",
        "probs = torch.sigmoid(self.scores)",
        "probs = torch.sigmoid(-self.scores)",
        "IST's probes suppress layers by sigmoid(-s) instead of sigmoid(s)",
        LAYERS,
    ),
    Mutant(
        "badam-descending-off-by-one",
        "layers",
        "layers/policies.py",
        "return list(range(n - 1, -1, -1))",
        "return list(range(n, 0, -1))",
        "BAdam's descending order starts one past the last layer",
        LAYERS,
    ),
    Mutant(
        "badam-block-start",
        "layers",
        "layers/policies.py",
        "start = period * self.n_active",
        "start = period",
        "BAdam's blocks of several layers overlap (a period advances one layer, not a block)",
        LAYERS,
    ),
    Mutant(
        "loss-credit-reward-sign",
        "layers",
        "layers/policies.py",
        "reward = self.previous_mean - mean_loss",
        "reward = mean_loss - self.previous_mean",
        "loss credit rewards a loss increase",
        LAYERS,
    ),
    Mutant(
        "loss-credit-beta-swapped",
        "layers",
        "layers/policies.py",
        "self.scores[i] = (1 - self.beta) * self.scores[i] + self.beta * reward",
        "self.scores[i] = self.beta * self.scores[i] + (1 - self.beta) * reward",
        "loss credit's smoothing swaps beta and 1 - beta",
        LAYERS,
    ),
    Mutant(
        "freeze-keeps-grad",
        "layers",
        "layers/freezing.py",
        "            p.requires_grad_(False)\n            p.grad = None\n",
        "            p.requires_grad_(False)\n",
        "freezing leaves the stale .grad (momentum and weight decay keep moving the frozen layer)",
        LAYERS,
    ),
    Mutant(
        "freeze-keeps-state",
        "layers",
        "layers/freezing.py",
        "state = optimizer.state.pop(p, None) if optimizer is not None else None",
        "state = optimizer.state.get(p, None) if optimizer is not None else None",
        "freezing reads the optimizer state but never releases it",
        LAYERS,
    ),
    Mutant(
        "activate-off-by-one",
        "layers",
        "layers/freezing.py",
        "frozen = [p for i, params in enumerate(layer_params) if i not in chosen for p in params]",
        "frozen = [p for i, params in enumerate(layer_params, 1) if i not in chosen for p in params]",
        "activate_layers numbers layers from 1 when choosing which to freeze",
        LAYERS,
    ),
    Mutant(
        "probe-scales-output",
        "layers",
        "layers/probes.py",
        "damped = hidden_in + factor * (hidden_out - hidden_in)",
        "damped = factor * hidden_out",
        "a suppression probe scales the layer's whole output instead of its residual contribution",
        LAYERS,
    ),
    Mutant(
        "loss-credit-period-sum",
        "layers",
        "layers/callback.py",
        "self.chooser.end_period(total / count)",
        "self.chooser.end_period(total)",
        "LayerwiseSampling feeds the period's summed loss instead of its mean to the policy",
        LAYERS,
    ),
    Mutant(
        "probe-loss-not-averaged",
        "layers",
        "layers/callback.py",
        "losses = (collectives.all_reduce_sum(local) / collectives.world_size()).tolist()",
        "losses = collectives.all_reduce_sum(local).tolist()",
        "IST's probe losses are summed over the ranks instead of averaged",
        LAYERS,
    ),
    # Issue 11's bugs 1 and 3, put back: decisions from one rank's own values.
    Mutant(
        "period-loss-per-rank",
        "layers",
        "layers/callback.py",
        "total, count = collectives.all_reduce_sum(self._period_loss).tolist()",
        "total, count = self._period_loss.tolist()",
        "a period's loss statistic from this rank's steps only: ranks credit and draw layers differently",
        LAYERS + (DDP,),
    ),
    Mutant(
        "probe-losses-per-rank",
        "layers",
        "layers/callback.py",
        "losses = (collectives.all_reduce_sum(local) / collectives.world_size()).tolist()",
        "losses = local.tolist()",
        "IST learns from this rank's probe losses only: ranks' layer importances drift apart",
        LAYERS + (DDP,),
    ),
    Mutant(
        "utility-from-micro-batches",
        "experts",
        "experts/callback.py",
        "    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:\n",
        "    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:\n"
        "        optimizer = trainer.optimizers[0]\n",
        "utility accumulated after each backward: one rank's unsynchronised micro-batch gradients under accumulation",
        EXPERTS + (DDP,),
    ),
    # Issue 15's signals, layer discovery and the report.
    Mutant(
        "ccs-budget-largest-first",
        "selection",
        "selection/ccs.py",
        "order = torch.argsort(counts, stable=True)",
        "order = torch.argsort(counts, descending=True, stable=True)",
        "CCS serves the largest strata first, so small strata lose their share",
        SELECTION,
    ),
    Mutant(
        "ccs-budget-floor-all",
        "selection",
        "selection/ccs.py",
        "take = min(int(counts[stratum]), rest // (counts.numel() - served))",
        "take = min(int(counts[stratum]), rest // counts.numel())",
        "CCS divides what is left by every stratum instead of those not yet served",
        SELECTION,
    ),
    Mutant(
        "perplexity-medium-off-centre",
        "selection",
        "selection/perplexity.py",
        '"medium": (measured - keep) // 2,',
        '"medium": (measured - keep) // 4,',
        "the medium perplexity band is not centred on the median",
        SELECTION,
    ),
    Mutant(
        "influence-cosine-not-distance",
        "layers",
        "layers/influence.py",
        "else 1.0 - similarity",
        "else similarity",
        "block influence sums the cosine similarity instead of 1 - cos: the most redundant layers look most influential",
        LAYERS,
    ),
    Mutant(
        "stack-nested-list",
        "layers",
        "layers/stack.py",
        'and not any(other is not module and name.startswith(f"{other_name}.") for other_name, other in lists if other_name)',
        'and not any(other is not module and name.startswith(f"{other_name}.") for other_name, other in lists if other_name and len(other) >= 2 and len({type(m) for m in other}) == 1)',
        "an expert list inside a mixed-class or one-layer decoder list is taken for the layer stack",
        LAYERS,
    ),
    Mutant(
        "report-lowest-loss",
        "reporting",
        "reporting/report.py",
        '"highest loss": seen[torch.argsort(ema, descending=True)[:k]],',
        '"highest loss": seen[torch.argsort(ema)[:k]],',
        "SampleReport lists the lowest-loss samples as the most suspicious",
        ("tests/reporting",),
    ),
    # ------------------------------------------------------------------ experts
    Mutant(
        "greedy-cap-le",
        "experts",
        "experts/utility.py",
        "chosen = next((e for e in order if since_restart[e] < cap), None)",
        "chosen = next((e for e in order if since_restart[e] <= cap), None)",
        "greedy allocation gives an expert cap + 1 new copies before moving on",
        EXPERTS,
    ),
    Mutant(
        "greedy-ascending",
        "experts",
        "experts/utility.py",
        "order = torch.argsort(-utility, stable=True).tolist()",
        "order = torch.argsort(utility, stable=True).tolist()",
        "greedy allocation visits the least useful experts first",
        EXPERTS,
    ),
    Mutant(
        "proportional-remainder-ascending",
        "experts",
        "experts/utility.py",
        "by_remainder = torch.argsort(share - copies, descending=True, stable=True)",
        "by_remainder = torch.argsort(share - copies, descending=False, stable=True)",
        "proportional allocation gives the leftover copies to the smallest remainders",
        EXPERTS,
    ),
    Mutant(
        "utility-gradient-abs",
        "experts",
        "experts/utility.py",
        'if metric == "gradient_squared":\n        return g.square().sum(dim=1)',
        'if metric == "gradient_squared":\n        return g.abs().sum(dim=1)',
        "gradient_squared utility sums |g| instead of g^2",
        EXPERTS,
    ),
    Mutant(
        "router-state-power",
        "experts",
        "experts/surgery.py",
        'state[key] = transform(value, 2 if key.endswith("_sq") else 1)',
        "state[key] = transform(value, 1)",
        "the router's optimizer state gets power 1 for second moments too",
        EXPERTS,
        equivalent="every transform passed to _remap_state (router rows and bias: copy or repeat_interleave) ignores the"
        " power argument; router state is copied, not scaled, so the power cannot change any value",
    ),
    Mutant(
        "granular-no-permute",
        "experts",
        "experts/adapters.py",
        "down = down.reshape(n, -1, parts, width).permute(0, 2, 1, 3).reshape(n * parts, -1, width) * output_scale",
        "down = down.reshape(n * parts, -1, width) * output_scale",
        "granular split slices down_proj by rows of the flattened tensor instead of by hidden units",
        EXPERTS,
    ),
    Mutant(
        "granular-unscaled",
        "experts",
        "experts/surgery.py",
        "block.split_experts(tensors, parts, s), float(parts))",
        "block.split_experts(tensors, parts, s), 1.0)",
        "granular split leaves the slices' outputs unscaled (each slice weighted w/m)",
        EXPERTS,
    ),
    Mutant(
        "granular-router-tiled",
        "experts",
        "experts/surgery.py",
        "_replace(param, param.data.repeat_interleave(parts, dim=0))",
        "_replace(param, param.data.repeat(parts, *([1] * (param.ndim - 1))))",
        "granular split tiles the router rows (e0, e1, e0, e1) instead of repeating each (e0, e0, e1, e1)",
        EXPERTS,
    ),
    Mutant(
        "duplicate-router-tiled",
        "experts",
        "experts/surgery.py",
        "index = sources.to(router.device)",
        "index = (torch.arange(sources.numel()) % router.shape[0]).to(router.device)",
        "duplicated experts' router rows are tiled by position instead of copied from each copy's source",
        EXPERTS,
    ),
    Mutant(
        "duplicate-noise-on-first",
        "experts",
        "experts/surgery.py",
        "copy[1:] = sources[1:] == sources[:-1]  # every copy but the first of its source",
        "copy[:-1] = sources[1:] == sources[:-1]  # every copy but the first of its source",
        "router noise lands on each source's first instance instead of its later copies",
        EXPERTS,
    ),
    Mutant(
        "duplicate-scales-renormalising",
        "experts",
        "experts/surgery.py",
        "scale = 1.0 if block.renormalizes or not scaled else float(factor)",
        "scale = 1.0 if not scaled else float(factor)",
        "duplicated copies' outputs are scaled by m even where the router renormalises (Mixtral)",
        EXPERTS,
    ),
    # ------------------------------------------------------------------ issue 23: the four it named, then fresh ones
    Mutant(
        "layer-draw-positions",
        "layers",
        "layers/policies.py",
        "return sorted(self.pinned + [self.candidates[i] for i in self.draw(period)])",
        "return sorted(self.pinned + self.draw(period))",
        "the layer draw returns positions in `candidates` instead of the layer indices they stand for",
        LAYERS,
        origin="issue23",
    ),
    Mutant(
        "upcycle-cap-dropped",
        "experts",
        "experts/surgery.py",
        "allocate_copies(utility[name], e * factor, allocation=allocation, cap=cap)",
        "allocate_copies(utility[name], e * factor, allocation=allocation)",
        "upcycle_experts does not pass `cap` to the greedy allocation (any cap but 3 ignored)",
        EXPERTS,
        origin="issue23",
    ),
    Mutant(
        "router-noise-on-originals",
        "experts",
        "experts/surgery.py",
        "rows[copy] += noise[copy]",
        "rows += noise",
        "router noise is added to the original experts' router rows too, not only to the copies'",
        EXPERTS,
        origin="issue23",
    ),
    Mutant(
        "dsir-min-length-gt",
        "dsir",
        "selection/dsir.py",
        "return torch.as_tensor(np.asarray(lengths)) >= min_length",
        "return torch.as_tensor(np.asarray(lengths)) > min_length",
        "DSIR's length filter drops documents of exactly `min_length` tokens (`>` for `>=`)",
        DSIR,
        origin="issue23",
    ),
    Mutant(
        "layers-restore-all-trainable",
        "layers",
        "layers/callback.py",
        "            p.requires_grad_(requires_grad)\n        self._user_requires_grad = {}",
        "            p.requires_grad_(True)\n        self._user_requires_grad = {}",
        "after a fit LayerwiseSampling makes every parameter trainable instead of giving back what the user had",
        LAYERS,
    ),
    Mutant(
        "layers-no-restore-on-exception",
        "layers",
        "layers/callback.py",
        "        # Lightning calls no teardown hook when fit raises (or is interrupted): the module is given back here.\n        self._leave()",
        "        # Lightning calls no teardown hook when fit raises (or is interrupted): the module is given back here.\n        return",
        "LayerwiseSampling gives the module back at teardown only, not when fit raises or is interrupted",
        LAYERS,
    ),
    Mutant(
        "layers-leave-keeps-masters",
        "layers",
        "layers/callback.py",
        "            self.masters.thaw(list(self.masters.masters))\n        for p, requires_grad",
        "            self.masters.masters.clear()\n        for p, requires_grad",
        "frozen layers leave the fit in bf16: their fp32 masters are dropped, not given back",
        LAYERS,
    ),
    Mutant(
        "layers-stale-parked-moments",
        "layers",
        "layers/callback.py",
        "        self._period_loss.zero_()\n        self.stash.parked = {}\n",
        "        self._period_loss.zero_()\n",
        "a next fit with the same LayerwiseSampling thaws moments parked from the last fit's optimizer into its new one",
        LAYERS,
    ),
    Mutant(
        "reducer-kept-after-exception",
        "weighting",
        "weighting/callback.py",
        "        # Lightning calls no teardown hook when fit raises or is interrupted (docs/architecture.md, contract 6).\n"
        "        if self.reducer is not None:",
        "        # Lightning calls no teardown hook when fit raises or is interrupted (docs/architecture.md, contract 6).\n"
        "        if self.reducer is None:",
        "a fit that raises leaves the reducer's training_step wrapper (and a stale reducer) on the module",
        WEIGHTING,
    ),
    Mutant(
        "warmup-warning-strict",
        "weighting",
        "weighting/callback.py",
        "self.warmup_steps >= total:",
        "self.warmup_steps > total:",
        "no warning when the warm-up is exactly as long as the run (every step unweighted)",
        WEIGHTING,
    ),
    Mutant(
        "warmup-phase-logged-late",
        "weighting",
        "weighting/callback.py",
        "active = float(trainer.global_step >= self.warmup_steps)",
        "active = float(trainer.global_step > self.warmup_steps)",
        "the logged phase says warm-up for one step after reweighting started",
        WEIGHTING,
    ),
    Mutant(
        "migrated-loss-credit-scores-dropped",
        "layers",
        "layers/callback.py",
        'policy = {"version": 1, "scores": state["importance"],',
        'policy = {"version": 1, "scores": torch.zeros_like(state["importance"]),',
        "a weightwise 0.1 checkpoint's loss-credit scores are read as zeros",
        ("tests/test_compatibility.py",),
    ),
    Mutant(
        "migrated-period-count",
        "layers",
        "layers/callback.py",
        '"period_loss": torch.tensor([sum(losses), float(len(losses))], dtype=torch.float64),',
        '"period_loss": torch.tensor([sum(losses), float(len(losses) + 1)], dtype=torch.float64),',
        "a weightwise 0.1 checkpoint's period losses are counted one too many (the period mean is misread)",
        ("tests/test_compatibility.py",),
    ),
    Mutant(
        "nlu-ema-std-biased",
        "selection",
        "selection/scoring.py",
        "history[1, ids] / correction.clamp_min(1e-30)",
        "history[1, ids] * 1.0",
        "NLU's EMA deviation without pandas' bias correction (the biased weighted variance)",
        SELECTION,
    ),
    Mutant(
        "el2n-guard-absolute",
        "selection",
        "selection/score_pruning.py",
        "misclassified > previous + self.ERROR_RISE",
        "misclassified > self.ERROR_RISE",
        "the EL2N collapse guard warns on any training error above 5% instead of a rise of 5 points",
        SELECTION,
    ),
    Mutant(
        "stream-resume-worker-share",
        "data",
        "data/stream.py",
        "trained = start.batches // workers + (1 if role < start.batches % workers else 0)",
        "trained = start.batches // workers + (1 if role <= start.batches % workers else 0)",
        "a resumed stream's worker counts one batch too many when the trained batches do not divide evenly",
        ("tests/data",),
    ),
    Mutant(
        "report-ties-by-id",
        "reporting",
        "reporting/report.py",
        'by_weight = by_ema[torch.argsort(weight[by_ema].nan_to_num(float("inf")), stable=True)]',
        'by_weight = torch.argsort(weight.nan_to_num(float("inf")), stable=True)',
        "SampleReport's lowest-weight view breaks weight ties by sample id again, not by the loss EMA",
        ("tests/reporting",),
    ),
]


# ---------------------------------------------------------------------------------------- running
@dataclass
class Result:
    id: str
    capability: str
    origin: str
    description: str
    status: str  # caught, survived, timeout, equivalent, error
    caught_by: str | None
    seconds: float
    tests: tuple[str, ...]


def copy_tree(dest: Path) -> None:
    """A fresh copy of the working tree (as it is now, uncommitted work included) at ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=IGNORED)
        else:
            shutil.copy2(source, dest / name)


class SnippetError(Exception):
    """A mutant's original snippet does not occur exactly once (the code moved on: update the table)."""


def occurrences(mutant: Mutant, root: Path) -> int:
    return (root / "src" / "weightwise" / mutant.file).read_text().count(mutant.original)


def apply(mutant: Mutant, root: Path) -> None:
    """Plant the mutant in the copy at ``root``; raise unless its snippet occurs exactly once."""
    path = root / "src" / "weightwise" / mutant.file
    text = path.read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise SnippetError(
            f"mutant {mutant.id!r}: the original snippet occurs {count} times in src/weightwise/{mutant.file}"
            f" (exactly 1 needed): {mutant.original!r}"
        )
    path.write_text(text.replace(mutant.original, mutant.mutated))


def environment(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = f"{root / 'src'}{os.pathsep}{root}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def check_shadowing(root: Path) -> str:
    """Import ``weightwise`` as the tests will: it must be the copy's."""
    done = subprocess.run(
        [str(PYTHON), "-c", "import weightwise; print(weightwise.__file__)"],
        cwd=root,
        env=environment(root),
        capture_output=True,
        text=True,
        timeout=120,
    )
    where = done.stdout.strip()
    if not where.startswith(str(root / "src")):
        raise SystemExit(f"the copy's weightwise does not shadow the installed one: imported {where!r} ({done.stderr[-2000:]})")
    return where


FAILURE = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def pytest(
    root: Path,
    selection: tuple[str, ...],
    timeout: float,
    *,
    stop_first: bool = True,
    deselect: tuple[str, ...] = (),
    quick: bool = False,
) -> tuple[str, str | None, float, str]:
    """Run a selection in the copy (``quick``: without the tests marked slow): (status, first failing test, seconds, output tail)."""
    command = [str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if stop_first else []), *selection]
    command += ["-m", "not slow"] if quick else []
    for test in deselect:
        command += ["--deselect", test]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=root, env=environment(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        out = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return "timeout", None, time.perf_counter() - start, out[-3000:]
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    failures = FAILURE.findall(done.stdout)
    first = failures[0][1] if failures else None
    if done.returncode == 0:
        return "survived", None, seconds, output[-3000:]
    if done.returncode in (1, 2) and (first or done.returncode == 2):
        return "caught", first or "collection error", seconds, output[-3000:]
    return "error", f"pytest exit {done.returncode}", seconds, output[-3000:]


def baseline(mutants: list[Mutant], timeout: float, quick: bool = False) -> tuple[list[str], str]:
    """The unmutated copy over the union of the selections: the tests failing there already."""
    root = WORK / "_baseline"
    copy_tree(root)
    where = check_shadowing(root)
    selection = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    status, _, seconds, output = pytest(root, selection, timeout, stop_first=False, quick=quick)
    failing = [name for _, name in FAILURE.findall(output)]
    print(f"baseline (unmutated copy, {' '.join(selection)}): {status} in {seconds:.0f} s; weightwise from {where}", flush=True)
    if status not in ("survived",) and not failing:
        raise SystemExit(f"the unmutated copy does not pass its tests ({status}):\n{output}")
    shutil.rmtree(root, ignore_errors=True)
    return failing, where


def run_mutant(mutant: Mutant, timeout: float, deselect: tuple[str, ...], keep: bool, quick: bool = False) -> Result:
    root = WORK / mutant.id
    copy_tree(root)
    try:
        apply(mutant, root)
    except SnippetError as error:  # the tree changed under the run: loud, counted as an error, never as caught
        print(f"!!! {error}", file=sys.stderr, flush=True)
        shutil.rmtree(root, ignore_errors=True)
        return Result(
            mutant.id, mutant.capability, mutant.origin, mutant.description, "error", "snippet not found", 0.0, mutant.tests
        )
    limit = timeout * (3 if DDP in mutant.tests else 1)
    status, caught_by, seconds, output = pytest(root, mutant.tests, limit, deselect=deselect, quick=quick)
    if status == "error":
        print(output, file=sys.stderr)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return Result(mutant.id, mutant.capability, mutant.origin, mutant.description, status, caught_by, seconds, mutant.tests)


def table(results: list[Result]) -> str:
    lines = ["| capability | mutant | mistake | result | caught by |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        by = f"`{r.caught_by}`" if r.caught_by else ""
        lines.append(
            f"| {r.capability} | `{r.id}`{' (issue)' if r.origin.startswith('issue') else ''} | {r.description} | {r.status} | {by} |"
        )
    return "\n".join(lines)


def totals(results: list[Result]) -> tuple[str, dict[str, dict[str, int]]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in results:
        if r.origin == "sanity":
            continue
        counts[r.capability][r.status] += 1
        counts["all"][r.status] += 1
    lines = [
        "| capability | run | caught | survived | timeout | error | equivalent (excluded) | share caught |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for capability in [*sorted(c for c in counts if c != "all"), "all"]:
        c = counts[capability]
        run = c["caught"] + c["survived"] + c["timeout"] + c["error"]
        killed = c["caught"] + c["timeout"]
        share = f"{100 * killed / run:.0f}% ({killed}/{run})" if run else "-"
        lines.append(
            f"| {capability} | {run} | {c['caught']} | {c['survived']} | {c['timeout']} | {c['error']} | {c['equivalent']} | {share} |"
        )
    return "\n".join(lines), {k: dict(v) for k, v in counts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated mutant ids")
    parser.add_argument("--capability", help="run only this capability's mutants")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per mutant (3x for DDP selections)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--keep", action="store_true", help="keep the mutated copies under /tmp/weightwise-mutants")
    parser.add_argument("--check", action="store_true", help="only check that every snippet occurs exactly once")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (not for recorded results)")
    parser.add_argument("--run-equivalent", action="store_true", help="also run the mutants marked equivalent")
    parser.add_argument("--quick", action="store_true", help='run the selections without the tests marked slow (-m "not slow")')
    args = parser.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise SystemExit(f"duplicate mutant ids: {sorted(duplicates)}")
    chosen = [
        m
        for m in MUTANTS
        if (not args.only or m.id in args.only.split(",")) and (not args.capability or m.capability == args.capability)
    ]
    if args.only:
        unknown = set(args.only.split(",")) - set(ids)
        if unknown:
            raise SystemExit(f"unknown mutant ids: {sorted(unknown)}")
    if args.list:
        for m in [SANITY, *chosen]:
            print(f"{m.id:36} {m.capability:10} {m.file:28} {'EQUIVALENT ' if m.equivalent else ''}{m.description}")
        return 0
    missing = [(m, occurrences(m, REPO)) for m in [SANITY, *chosen] if occurrences(m, REPO) != 1]
    if args.check:
        for m in [SANITY, *chosen]:
            count = occurrences(m, REPO)
            print(f"{'ok  ' if count == 1 else 'BAD '} {m.id:36} found {count}x in {m.file}")
        return 1 if missing else 0
    if missing:  # fail loudly before spending any time
        raise SystemExit(
            "original snippets not found exactly once in the working tree:\n"
            + "\n".join(f"  {m.id}: {count}x in src/weightwise/{m.file}: {m.original!r}" for m, count in missing)
        )

    started = dt.datetime.now().astimezone()
    clock = time.perf_counter()
    command = " ".join(["python -m benchmarks.mutations", *(argv if argv is not None else sys.argv[1:])])
    print(f"# weightwise mutation run, {started:%Y-%m-%d %H:%M %Z}: `{command}`\n", flush=True)
    runnable = [m for m in chosen if args.run_equivalent or not m.equivalent]
    deselect: tuple[str, ...] = ()
    where = None
    if not args.no_baseline:
        failing, where = baseline([SANITY, *runnable], args.timeout * 3, args.quick)
        deselect = tuple(failing)
        if failing:
            print(f"deselected for every mutant (failing in the unmutated copy): {failing}", flush=True)

    sanity = run_mutant(SANITY, args.timeout, deselect, args.keep, args.quick)
    print(f"sanity mutant ({SANITY.description}): {sanity.status} by {sanity.caught_by} in {sanity.seconds:.0f} s", flush=True)
    if sanity.status != "caught":
        raise SystemExit("the sanity mutant survived: the mutated copy is not what the tests import")

    results: list[Result] = []
    for mutant in chosen:
        if mutant.equivalent and not args.run_equivalent:
            results.append(
                Result(mutant.id, mutant.capability, mutant.origin, mutant.description, "equivalent", None, 0.0, mutant.tests)
            )
            print(f"- {mutant.id}: equivalent, not run ({mutant.equivalent})", flush=True)
            continue
        result = run_mutant(mutant, args.timeout, deselect, args.keep, args.quick)
        results.append(result)
        print(
            f"- {mutant.id}: {result.status}{' by ' + result.caught_by if result.caught_by else ''} ({result.seconds:.0f} s)",
            flush=True,
        )

    wall = time.perf_counter() - clock
    summary, counts = totals(results)
    equivalents = [f"- `{m.id}`: {m.equivalent}" for m in chosen if m.equivalent]
    report = "\n\n".join(
        [
            f"## Mutants ({started:%Y-%m-%d}, `{command}`, {wall / 60:.1f} min wall)",
            table([sanity, *results]),
            "## Totals",
            summary,
            *(["## Excluded as equivalent", "\n".join(equivalents)] if equivalents else []),
            *([f"Deselected (failing unmutated): {', '.join(deselect)}"] if deselect else []),
        ]
    )
    print("\n" + report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "date": started.isoformat(timespec="seconds"),
                "command": command,
                "wall_seconds": round(wall, 1),
                "weightwise_imported_from": where,
                "deselected": list(deselect),
                "sanity": asdict(sanity),
                "results": [asdict(r) for r in results],
                "equivalent": {m.id: m.equivalent for m in chosen if m.equivalent},
                "totals": counts,
                "markdown": report,
            },
            indent=2,
        )
    )
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
