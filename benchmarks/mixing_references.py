"""weightwise's mixing policies side by side with their authors' update rules, on identical losses.

Each reference's update is transcribed below in its own terms (Python floats / numpy, its own
variable names), with the file and function it comes from; nothing of it is imported by the
package. Both sides are fed the same per-domain loss sequences (random domains present or absent
at each step, losses drifting down with noise) and must produce the same weights at every step to
``TOLERANCE``.

* ODM - ``alon-albalak/online-data-mixing``, ``megatron/data/data_sampling_utils.py``:
  ``SmoothedMeanWeightUpdater.group_update`` and ``UpdateScheduler.requires_update``, as called by
  ``train_mixed_minibatch`` in ``megatron/training.py`` (rewards: the mean loss of each domain in
  the batch, iteration counted from 1).
* DoReMi - ``sangmichaelxie/doremi``, ``doremi/trainer.py``, ``DoReMiTrainer.update_domain_weights``
  (``doremiv1``), torch as there; the per-domain score is the mean clipped excess (given here
  directly as the domain's mean).
* Aioli - ``HazyResearch/aioli``, ``trainer/aioli_trainer.py``: ``learn_params_subroutine``'s
  ``new_graph`` accumulation and linear solve, and ``train``'s normalisation, EMA and
  ``weights = weights_init * exp(eta * ema_graph.sum(axis=0))``; the held-out losses of each
  evaluation are given (identical on both sides), the burst order too (weightwise's seeded order,
  replayed by the transcription, since the reference draws it from numpy's global state).
* ADO - ``yidingjiang/ado``, ``src/data_selectors/ado.py``: ``AdoSelector.update`` (counts,
  ``p_history``, loss imputation) and ``curr_dist`` (the policy from the fitted parameters) with
  ``clip_min_probability``; the scaling-law *fit* (jaxopt L-BFGS) is not transcribed: both sides
  use the same fitted parameters (weightwise's fit is compared with scipy's ``curve_fit`` on a known
  curve instead, to a tolerance). ``savgol_filter`` is compared with scipy's when installed.

Throughput (``--throughput``): the per-step cost of mixing next to the step itself, in a real
Lightning fit of a small Llama (2 layers, width 128, 8 x 256 tokens a step, AdamW) on packed rows
of four domains of real text (the sources of four Python standard-library modules), drawn through
a ``MixingStream``: the time inside ``DomainMixing`` (per-domain statistics, the policy's update,
publishing, logging) and in the stream's draws, against the whole step (batch start to batch end).
ADO's scaling-law refit, which runs once per ``update_every`` steps, is timed on its own.

Run (from the repository root): ``.venv/bin/python -m benchmarks.mixing_references [--steps 300] [--seed 0]``, or
``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.mixing_references --throughput`` (20 steps a policy, one thread).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from weightwise.mixing.policies import ADO, ODM, Aioli, DomainStats, DoReMi, fit_power_laws, power_law, savgol_smooth

TOLERANCE = 1e-6


# --------------------------------------------------------------------------- the loss sequences
def loss_sequence(steps: int, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per step: ``[K]`` sample counts (some zero: domain absent) and ``[K]`` mean losses."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(2.0, 4.0, k)
    out = []
    for t in range(steps):
        counts = rng.integers(0, 5, k)
        if counts.sum() == 0:
            counts[rng.integers(k)] = 1
        losses = base * (1 + t) ** -rng.uniform(0.05, 0.2, k) + rng.normal(0, 0.05, k)
        out.append((counts, np.where(counts > 0, losses, np.nan)))
    return out


def stats_of(counts: np.ndarray, losses: np.ndarray, scores: dict[str, np.ndarray] | None = None) -> DomainStats:
    c = torch.tensor(counts, dtype=torch.float64)
    return DomainStats(
        torch.tensor(losses, dtype=torch.float64),
        c,
        c,
        {n: torch.tensor(v, dtype=torch.float64) for n, v in (scores or {}).items()},
    )


# --------------------------------------------------------------------------- ODM (transcribed)
class ReferenceODM:
    """``SmoothedMeanWeightUpdater`` + ``UpdateScheduler`` (alon-albalak/online-data-mixing)."""

    def __init__(self, dataset_names, weights, smoothing_factor, warmup_steps, update_frequency):
        self.dataset_names = dataset_names
        self.dataset_map = {name: i for i, name in enumerate(dataset_names)}
        self.num_datasets = len(dataset_names)
        self.weights = list(weights)
        self._estimated_reward = {name: 0.0 for name in dataset_names}
        total_weights = np.sum(weights)
        self._probabilities = {name: weight / total_weights for name, weight in zip(dataset_names, weights)}
        self.eps = 1 / self.num_datasets
        self.prev_eps = None
        self.smoothing_factor = smoothing_factor
        self.warmup_steps, self.update_frequency = warmup_steps, update_frequency
        self.current = list(self._probabilities.values())

    def requires_update(self, iteration):
        return iteration > self.warmup_steps and iteration % self.update_frequency == 0

    def group_update(self, dataset_names, rewards, iteration):
        self.prev_eps = self.eps
        self.eps = min(1 / self.num_datasets, math.sqrt(math.log(self.num_datasets) / (self.num_datasets * iteration)))
        for name, reward in zip(dataset_names, rewards):
            self._estimated_reward[name] = self.smoothing_factor * self._estimated_reward[name] + (
                1 - self.smoothing_factor
            ) * math.exp(reward)
        total_estimated_rewards = sum((r * self.prev_eps) for r in self._estimated_reward.values())
        scaling_factor = (1 - self.num_datasets * self.eps) / total_estimated_rewards
        for name in self.dataset_names:
            self.weights[self.dataset_map[name]] = self._estimated_reward[name] * self.prev_eps * scaling_factor + self.eps
        total_weights = sum(self.weights)
        for name in self.dataset_names:
            self._probabilities[name] = self.weights[self.dataset_map[name]] / total_weights
        return list(self._probabilities.values())

    def step(self, iteration, counts, losses):
        # train_mixed_minibatch: batch_losses holds the domains sampled this iteration, averaged.
        if self.requires_update(iteration):
            names = [n for n, c in zip(self.dataset_names, counts) if c > 0]
            rewards = [float(losses[self.dataset_map[n]]) for n in names]
            self.current = self.group_update(names, rewards, iteration)
        return self.current


def compare_odm(steps: int, seed: int, k: int = 4) -> float:
    sequence = loss_sequence(steps, k, seed)
    initial = np.random.default_rng(seed + 1).uniform(1, 3, k)
    ref = ReferenceODM([f"d{i}" for i in range(k)], initial.tolist(), 0.5, 3, 2)
    ours = ODM(k, torch.tensor(initial), smoothing=0.5, warmup_steps=3, update_every=2)
    worst = 0.0
    for t, (counts, losses) in enumerate(sequence, start=1):
        expected = np.array(ref.step(t, counts, losses))
        got = ours.update(t, stats_of(counts, losses)).numpy()
        worst = max(worst, float(np.abs(expected - got).max()))
    return worst


# --------------------------------------------------------------------------- DoReMi (transcribed)
class ReferenceDoReMi:
    """``DoReMiTrainer.update_domain_weights`` with ``doremi_optimizer == 'doremiv1'`` (sangmichaelxie/doremi)."""

    def __init__(self, weights, reweight_eta, reweight_eps):
        self.train_domain_weights = torch.tensor(weights, dtype=torch.float64)
        self.perdomain_scores = torch.zeros(len(weights), dtype=torch.float64)
        self.reweight_eta, self.reweight_eps = reweight_eta, reweight_eps

    def update(self, domain_means, present):
        train_domain_weights = self.train_domain_weights.clone()
        perdomain_scores = []
        for domain_id in range(len(train_domain_weights)):
            if present[domain_id]:
                curr_domain_scores = torch.tensor(domain_means[domain_id], dtype=torch.float64)
            else:
                curr_domain_scores = self.perdomain_scores[domain_id]
            perdomain_scores.append(curr_domain_scores)
        self.perdomain_scores[:] = torch.tensor(perdomain_scores)
        log_new_train_domain_weights = torch.log(train_domain_weights) + self.reweight_eta * self.perdomain_scores
        log_new_train_domain_weights = log_new_train_domain_weights - torch.logsumexp(log_new_train_domain_weights, dim=0)
        train_domain_weights = (1 - self.reweight_eps) * torch.exp(log_new_train_domain_weights) + self.reweight_eps / len(
            log_new_train_domain_weights
        )
        self.train_domain_weights = train_domain_weights
        return train_domain_weights


def compare_doremi(steps: int, seed: int, k: int = 5) -> float:
    sequence = loss_sequence(steps, k, seed)
    rng = np.random.default_rng(seed + 2)
    ref = ReferenceDoReMi([1 / k] * k, 1.0, 1e-3)
    ours = DoReMi(k, eta=1.0, smoothing=1e-3)
    worst = 0.0
    for t, (counts, losses) in enumerate(sequence, start=1):
        excess = np.where(counts > 0, np.clip(losses - rng.uniform(1.5, 3.0, k), 0, None), np.nan)
        expected = ref.update(excess, counts > 0).numpy()
        got = ours.update(t, stats_of(counts, losses, {"excess_loss": excess})).numpy()
        worst = max(worst, float(np.abs(expected - got).max()))
    return worst


# --------------------------------------------------------------------------- Aioli (transcribed)
class ReferenceAioli:
    """``AioliTrainer``'s LearnParams and weight update (HazyResearch/aioli, ``trainer/aioli_trainer.py``)."""

    def __init__(self, k, lp_rounds, one_hot_factor, eta, ema, aioli_normalize_A=True, aioli_diagonal=False):
        self.k, self.lp_rounds, self.one_hot_factor, self.eta, self.ema = k, lp_rounds, one_hot_factor, eta, ema
        self.aioli_normalize_A, self.aioli_diagonal = aioli_normalize_A, aioli_diagonal
        self.weights = np.ones(k)

    def learn_params(self, loss_0, mixture_order, evaluations):
        previous_loss = loss_0.copy()
        new_graph = np.zeros((self.k, self.k))
        for onehot_idx, new_loss in zip(mixture_order, evaluations):
            new_graph[:, onehot_idx] += previous_loss - new_loss
            previous_loss = new_loss
        new_graph /= self.lp_rounds
        if self.one_hot_factor != 1 and not self.aioli_diagonal:
            weight_matrix = np.zeros((self.k, self.k))
            for i in range(self.k):
                weight_row = np.ones(self.k) * (1 - self.one_hot_factor) / (self.k - 1)
                weight_row[i] = self.one_hot_factor
                weight_matrix[i] = weight_row
            A = np.zeros((self.k, self.k))
            for i, row in enumerate(new_graph):
                A[i] = np.linalg.solve(weight_matrix, row)
            new_graph = A
        return new_graph

    def round(self, i, graph):
        weights_init = np.ones(self.k)
        if self.aioli_normalize_A:
            min_entry = graph.min()
            if min_entry < 0:
                graph -= min_entry
            graph /= graph.sum()
        if self.ema is not None:
            if i == 0:
                self.ema_graph = graph
            else:
                self.ema_graph = (1 - self.ema) * graph + self.ema * self.ema_graph
            self.weights = np.multiply(weights_init, np.exp(self.eta * self.ema_graph.sum(axis=0)))
        elif i == 0:
            self.weights = np.multiply(weights_init, np.exp(self.eta * graph.sum(axis=0)))
        else:
            self.weights = np.multiply(self.weights, np.exp(self.eta * graph.sum(axis=0)))
        return self.weights / self.weights.sum()


def compare_aioli(rounds: int, seed: int, k: int = 3, ema: float | None = 0.1) -> float:
    rng = np.random.default_rng(seed + 3)
    lp_rounds, lp_steps, round_steps = 2, 2, 20
    ours = Aioli(
        k, lp_rounds=lp_rounds, lp_steps=lp_steps, round_steps=round_steps, eta=0.2, ema=ema, one_hot_factor=0.625, seed=seed
    )
    ref = ReferenceAioli(k, lp_rounds, 0.625, 0.2, ema)
    queue: list[np.ndarray] = []

    def evaluate() -> torch.Tensor:
        losses = rng.uniform(2.0, 3.0, k)
        queue.append(losses)
        return torch.tensor(losses)

    ours.start(evaluate)
    worst, step, null = 0.0, 0, stats_of(np.ones(k), np.ones(k))
    for i in range(rounds):
        order = list(ours.order)
        loss_0 = queue[-1]
        first = len(queue)
        for _ in range(ours.lp_duration):
            step += 1
            ours.update(step, null, evaluate)
        expected = ref.round(i, ref.learn_params(loss_0, order, queue[first:]))
        worst = max(worst, float(np.abs(expected - ours.weights.numpy()).max()))
        for _ in range(round_steps - ours.lp_duration):
            step += 1
            ours.update(step, null, evaluate)
    return worst


# --------------------------------------------------------------------------- ADO (transcribed)
def reference_clip_min_probability(probs, min_prob):
    total_deficit = max(min_prob * len(probs) - probs.sum(), 0)
    scale_factor = (1 - total_deficit) / probs.sum()
    scaled_probs = probs * scale_factor
    clipped_probs = np.maximum(scaled_probs, min_prob)
    return clipped_probs / clipped_probs.sum()


class ReferenceADO:
    """``AdoSelector.update`` (bookkeeping) and ``curr_dist`` (yidingjiang/ado, ``src/data_selectors/ado.py``)."""

    def __init__(self, empirical_dist):
        self.k = len(empirical_dist)
        self.empirical_dist = empirical_dist
        self.task_cnt_TxK = np.empty((0, self.k), dtype=np.int64)
        self.task_loss_TxK = np.empty((0, self.k), dtype=np.float64)
        self.p = self.p_avg = self.p_history = empirical_dist
        self.current_params = None

    def update(self, counts_K, task_loss_in):
        increment = np.ones_like(counts_K[None]) * counts_K.sum()  # use_same_step_size
        self.task_cnt_TxK = np.append(self.task_cnt_TxK, increment, axis=0)
        count_dist = counts_K / counts_K.sum()
        self.p_history = 0.9 * self.p_history + (1 - 0.9) * count_dist
        avg_loss = np.nansum(counts_K * task_loss_in) / counts_K.sum()  # np.mean(losses) over the batch's samples
        task_loss_K = np.zeros((self.k,))
        for i in range(self.k):
            if counts_K[i] > 0:
                task_loss_K[i] = task_loss_in[i]
            elif self.task_loss_TxK.shape[0] > 0:
                task_loss_K[i] = self.task_loss_TxK[-1, i]
            else:
                task_loss_K[i] = avg_loss
        self.task_loss_TxK = np.append(self.task_loss_TxK, task_loss_K[None], axis=0)

    def curr_dist(self, itr):
        irred_loss_K = np.exp(self.current_params[:, 1])
        expnt_K = np.maximum(self.current_params[:, 2], 0.05)
        a, e, alpha = self.current_params[:, 0], self.current_params[:, 1], self.current_params[:, 2]
        n = self.task_cnt_TxK.sum(0)
        curr_loss_K = np.exp(e) + np.exp(a) / n**alpha
        n_seen_K = np.float64(np.sum(self.task_cnt_TxK, 0))
        slope_K = expnt_K * (curr_loss_K - irred_loss_K) / n_seen_K
        weighted_slope_K = slope_K * self.empirical_dist * (self.p_history * (1 - self.p_history)) ** 0.5
        dist_K = weighted_slope_K / weighted_slope_K.sum()
        dist_K = reference_clip_min_probability(dist_K, 1e-2)
        self.p = 0.9 * self.p_avg + 0.1 * dist_K
        self.p_avg = (1 - 1 / (itr + 1)) * self.p_avg + 1 / (itr + 1) * dist_K
        return self.p


def compare_ado(steps: int, seed: int, k: int = 4) -> float:
    """Both sides on the same losses and the same fitted parameters (given, not fitted)."""
    sequence = loss_sequence(steps, k, seed)
    rng = np.random.default_rng(seed + 4)
    prior = rng.uniform(1, 3, k)
    prior = prior / prior.sum()
    params = np.stack([rng.uniform(0, 2, k), rng.uniform(0.5, 1.0, k), rng.uniform(0.02, 0.6, k)], 1)
    ref = ReferenceADO(prior)
    ref.current_params = params
    ours = ADO(k, torch.tensor(prior), start_step=0, update_every=10**9, window=5)
    ours.params = torch.tensor(params)
    worst = 0.0
    for t, (counts, losses) in enumerate(sequence, start=1):
        ref.update(counts, losses)
        expected = ref.curr_dist(t)
        got = ours.update(t, stats_of(counts, losses)).numpy()
        worst = max(worst, float(np.abs(expected - got).max()))
    return worst


def compare_ado_fit() -> tuple[float, float | None]:
    """weightwise's fit on a known curve (relative error of the law at the curve's points), and
    its Savitzky-Golay smoothing against scipy's (``None`` without scipy)."""
    n = torch.arange(1, 401, dtype=torch.float64)[::10] * 64
    truth = torch.tensor(
        [[1.5, 0.9, 0.35], [2.5, 0.6, 0.2]], dtype=torch.float64
    )  # (a, e, alpha), e >= 0.5 as the reference bounds
    curves = torch.stack([power_law(truth, v.expand(2)) for v in n], 1)
    fitted = fit_power_laws(n.expand(2, -1), curves)
    predicted = torch.stack([power_law(fitted, v.expand(2)) for v in n], 1)
    fit_error = float(((predicted - curves) / curves).abs().max())
    try:
        from scipy.signal import savgol_filter
    except ImportError:
        return fit_error, None
    noisy = torch.tensor(np.random.default_rng(0).normal(0, 1, (3, 150)).cumsum(1))
    expected = torch.tensor(savgol_filter(noisy.numpy(), 101, 3, axis=-1))
    return fit_error, float((savgol_smooth(noisy, 101, 3) - expected).abs().max())


def run(steps: int, seed: int) -> dict[str, float | None]:
    fit_error, savgol_error = compare_ado_fit()
    return {
        "odm": compare_odm(steps, seed),
        "doremi": compare_doremi(steps, seed),
        "aioli (ema 0.1)": compare_aioli(max(2, steps // 50), seed),
        "aioli (no ema)": compare_aioli(max(2, steps // 50), seed, ema=None),
        "ado (policy from fitted laws)": compare_ado(steps, seed),
        "ado fit on a known law: max relative error of the fitted law": fit_error,
        "savgol_smooth vs scipy's savgol_filter: max |difference|": savgol_error,
    }


EXACT = ("odm", "doremi", "aioli (ema 0.1)", "aioli (no ema)", "ado (policy from fitted laws)")
"""The comparisons of weight updates, held to :data:`TOLERANCE`."""


# --------------------------------------------------------------------------- throughput
def throughput(steps: int = 20, seed: int = 0) -> dict[str, float]:
    """Milliseconds per step: the whole step, and the part of it spent in mixing, per policy."""
    import argparse as argparse_module
    import inspect
    import json
    import time
    import typing

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM

    from weightwise.losses import token_cross_entropy
    from weightwise.mixing import DomainMixing, MixingStream, excess_loss
    from weightwise.mixing import stream as stream_module

    length, batch = 256, 8

    def rows(module) -> list[dict[str, torch.Tensor]]:
        data = torch.tensor(list(inspect.getsource(module).encode()))
        n = data.numel() // length
        return [{"input_ids": data[i * length : (i + 1) * length]} for i in range(n)]

    domains = {m.__name__: rows(m) for m in (inspect, argparse_module, typing, json)}

    class LM(pl.LightningModule):
        def __init__(self, reference: bool):
            super().__init__()
            torch.manual_seed(seed)
            config = LlamaConfig(
                vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
            )
            self.model = LlamaForCausalLM(config)
            self.reference = LlamaForCausalLM(config).requires_grad_(False) if reference else None

        def training_step(self, b, i):
            losses, mask = token_cross_entropy(self.model(input_ids=b["input_ids"]).logits, b["input_ids"], shift=True)
            out = {"loss": losses, "mask": mask}
            if self.reference is not None:
                with torch.no_grad():
                    ref, _ = token_cross_entropy(self.reference(input_ids=b["input_ids"]).logits, b["input_ids"], shift=True)
                out["scores"] = {"excess_loss": excess_loss(losses, ref, mask)}
            return out

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Clock(pl.Callback):
        def __init__(self):
            self.steps: list[float] = []

        def on_train_batch_start(self, *args):
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.steps.append(time.perf_counter() - self.start)

    spent = {"mixing": 0.0, "draw": 0.0}

    def timed(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t

        setattr(owner, name, wrapper)
        return original

    results: dict[str, float] = {}
    k = len(domains)
    for name, make, log_every in (
        ("odm, logging every step", lambda: ODM(k, warmup_steps=0), 1),
        ("odm, logging every 50 steps", lambda: ODM(k, warmup_steps=0), 50),
        ("doremi (reference forward in the step), logging every 50", lambda: DoReMi(k), 50),
        ("ado (no refit in the window), logging every 50", lambda: ADO(k, start_step=0, update_every=10**9, window=5), 50),
    ):
        originals = [
            (DomainMixing, "sample_weights", timed(DomainMixing, "sample_weights", "mixing")),
            (DomainMixing, "on_train_batch_end", timed(DomainMixing, "on_train_batch_end", "mixing")),
            (stream_module, "fill_batch", timed(stream_module, "fill_batch", "draw")),
        ]
        spent.update(mixing=0.0, draw=0.0)
        try:
            stream = MixingStream(domains, batch_size=batch, seed=seed, num_replicas=1, rank=0)
            clock = Clock()
            fit = pl.Trainer(
                accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[DomainMixing(make(), stream), clock], log_every_n_steps=log_every,
            )  # fmt: skip
            fit.fit(LM(reference=name.startswith("doremi")), DataLoader(stream, batch_size=batch))
        finally:
            for owner, attr, original in originals:
                setattr(owner, attr, original)
        measured = clock.steps[5:]  # after warm-up
        results[f"{name}: step ms (median)"] = 1e3 * sorted(measured)[len(measured) // 2]
        results[f"{name}: mixing ms/step"] = 1e3 * spent["mixing"] / steps
        results[f"{name}: stream draws ms/step"] = 1e3 * spent["draw"] / steps
    counts = torch.arange(1, 1001, dtype=torch.float64).expand(k, -1) * batch
    curves = 2 + 3 * counts**-0.3
    t = time.perf_counter()
    fit_power_laws(counts[:, ::10], curves[:, ::10])
    results[f"ado refit ({k} domains, 100 points; once per update_every steps) ms"] = 1e3 * (time.perf_counter() - t)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--throughput", action="store_true", help="time mixing next to the training step instead")
    args = parser.parse_args()
    if args.throughput:
        torch.set_num_threads(1)  # the machine's cores are shared; one thread, as in the tests
        for name, value in throughput(seed=args.seed).items():
            print(f"{name:80s} {value:9.2f}")
        return
    results = run(args.steps, args.seed)
    for name, value in results.items():
        shown = "n/a (scipy not installed)" if value is None else f"{value:.3e}"
        label = f"{name}: max |weightwise - reference| weight" if name in EXACT else name
        print(f"{label:66s} {shown}")
    exact = [name for name in EXACT if results[name] > TOLERANCE]
    print("all weight updates within", TOLERANCE if not exact else f"{TOLERANCE} EXCEPT {exact}")


if __name__ == "__main__":
    main()
