"""Mixing policies: how the domain weights move, one optimizer step at a time (the functional core).

A policy sees, after every optimizer step, :class:`DomainStats` - each domain's loss over the step's
global batch (reduced over every rank and every accumulated micro-batch, so all ranks hold the same
numbers, docs/architecture.md contract 5) - and returns the mixture the next batches are drawn
with. It is plain tensors in, a tensor out: usable in any loop, checkpointed as a state dict.

Each policy transcribes its authors' update (cited in its docstring; ``benchmarks/mixing_references.py``
replays the transcriptions side by side on identical loss sequences). Their departures are named
options. Weights are float64 on the CPU: a handful of numbers per step, computed like the
references' numpy/Python floats.

Collapse: a mixture that puts (almost) everything on one domain starves the others of the very
signal that could bring them back. ODM (``eps``), DoReMi (``smoothing``) and ADO (``min_probability``)
mix in the uniform distribution by construction; Aioli has no floor in its reference, so weightwise
adds none by default. Whatever the policy, :class:`weightwise.mixing.DomainMixing` can floor the
weights (``min_weight``) and warns and logs when one domain holds more than ``collapse_threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from weightwise.core.checkpoints import state_version, with_version

Evaluate = Callable[[], Tensor]
"""Per-domain held-out losses ``[K]`` of the model as it is now (Aioli's LearnParams evaluations)."""


@dataclass
class DomainStats:
    """One optimizer step's per-domain statistics over the global batch.

    Attributes:
        losses: ``[K]`` mean loss of each domain's samples (token-weighted when the step gave token
            counts); ``nan`` for a domain without samples this step.
        samples: ``[K]`` samples of each domain.
        tokens: ``[K]`` valid tokens of each domain (the samples, when the step gave no token counts).
        scores: named ``[K]`` per-domain means of per-sample signals (e.g. DoReMi's ``"excess_loss"``).
    """

    losses: Tensor
    samples: Tensor
    tokens: Tensor
    scores: dict[str, Tensor] = field(default_factory=dict)

    @property
    def present(self) -> Tensor:
        """``[K]`` bool: the domains with samples this step."""
        return self.samples > 0


def check_weights(weights: Tensor | Sequence[float], num_domains: int | None = None, what: str = "weights") -> Tensor:
    """``weights`` as a float64 distribution (normalised), after checking it is one.

    Raises:
        ValueError: not 1-D, the wrong length, a negative or non-finite entry, or all zero.
    """
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().clone()
    if w.ndim != 1 or (num_domains is not None and w.numel() != num_domains):
        raise ValueError(f"{what} must be a 1-D vector of {num_domains or 'K'} domain weights, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise FloatingPointError(f"{what} are not finite: {w.tolist()}; the policy's inputs (per-domain losses) were NaN/inf")
    if (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError(f"{what} must be non-negative with a positive sum, got {w.tolist()}")
    return w / w.sum()


class MixingPolicy:
    """Base class: the current mixture and how one step's statistics move it.

    Args:
        num_domains: K.
        initial: the starting mixture ``[K]`` (normalised; default uniform).

    Attributes:
        weights: ``[K]`` float64, the mixture the next batches are drawn with.
        score: the per-sample signal (a ``training_step`` score name) the policy reads, if any.
    """

    STATE_VERSION = 1
    score: str | None = None

    def __init__(self, num_domains: int, initial: Tensor | Sequence[float] | None = None) -> None:
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        self.num_domains = num_domains
        self.weights = check_weights(torch.ones(num_domains) if initial is None else initial, num_domains, "initial weights")

    def start(self, evaluate: Evaluate | None) -> None:
        """Called once before training (not on a resume); a policy that needs held-out losses first takes them here."""

    def update(self, step: int, stats: DomainStats, evaluate: Evaluate | None = None) -> Tensor:
        """Take the statistics of optimizer step ``step`` (1-based: the number of steps done) and
        return the new mixture (also kept in :attr:`weights`)."""
        return self.weights

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return with_version({"policy": type(self).__name__, "weights": self.weights.clone(), **self._state()}, self.STATE_VERSION)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state_version(state, type(self).__name__, self.STATE_VERSION)
        if state["policy"] != type(self).__name__ or state["weights"].numel() != self.num_domains:
            raise ValueError(
                f"the checkpoint holds a {state['policy']} over {state['weights'].numel()} domains; this run has a"
                f" {type(self).__name__} over {self.num_domains}. Resume with the same policy and domains."
            )
        self.weights = state["weights"].clone()
        self._load_state(state)


class FixedMixture(MixingPolicy):
    """A mixture that never moves: the baselines.

    ``FixedMixture.natural(sizes)`` draws each domain in proportion to its size (tokens or samples),
    ``FixedMixture.uniform(K)`` draws every domain equally, ``FixedMixture(K, weights)`` as given.

    Example::

        >>> FixedMixture.natural([300, 100]).weights
        tensor([0.7500, 0.2500], dtype=torch.float64)
    """

    @classmethod
    def natural(cls, sizes: Sequence[float] | Tensor) -> FixedMixture:
        sizes = torch.as_tensor(sizes, dtype=torch.float64)
        return cls(sizes.numel(), sizes)

    @classmethod
    def uniform(cls, num_domains: int) -> FixedMixture:
        return cls(num_domains)


class ODM(MixingPolicy):
    """Online Data Mixing: a multi-armed bandit over domains, rewarded by their training loss.

    Albalak, Pan, Raffel, Wang, "Efficient Online Data Mixing For Language Model Pre-Training"
    (arXiv 2312.02406, 2023); authors' code ``alon-albalak/online-data-mixing``,
    ``megatron/data/data_sampling_utils.py``, ``SmoothedMeanWeightUpdater.group_update`` (the class
    its README names as the paper's method), called every iteration of ``train_mixed_minibatch``
    (``megatron/training.py``) with each sampled domain's mean loss (all-reduced over ranks). Per
    update at iteration ``t``::

        eps_prev, eps = eps, min(1/K, sqrt(ln K / (K t)))
        R_d = a R_d + (1 - a) exp(loss_d)          for the domains in the batch (R starts at 0)
        w_d = (1 - K eps) R_d / sum_j R_j + eps,  p = w / sum(w)

    Loss-proportional sampling (a high loss draws more data), with the EXP3 exploration floor
    ``eps`` mixed in - it never lets a domain vanish. Updates start after ``warmup_steps`` (the
    initial mixture until then) and run every ``update_every`` steps (``t % update_every == 0``).

    Defaults are the paper's run (``scripts/train_1B_ema_0.5smoothing.sh``): smoothing 0.5, warm-up
    2000 steps, update every step; the class default smoothing is 0.9. Departure: the reference
    draws one domain per micro-batch and rewards a domain with the mean of its micro-batches' mean
    token losses; weightwise rewards the token-weighted mean loss of the domain's samples in the
    step (the same number when every micro-batch is one domain of equal token counts - pass
    ``draw="batch"`` to the sampler or stream for the reference's one-domain micro-batches).

    Args:
        num_domains: K.
        initial: starting mixture (the reference starts from the natural Pile weights).
        smoothing: ``a``, the reward's moving-average factor.
        warmup_steps: steps on the initial mixture before the first update.
        update_every: steps between updates.

    Raises:
        ValueError: smoothing outside [0, 1), a negative warm-up, a non-positive interval.

    Example::

        >>> import torch
        >>> odm = ODM(2, warmup_steps=0)
        >>> stats = DomainStats(torch.tensor([3.0, 1.0]), torch.tensor([4, 4]), torch.tensor([4, 4]))
        >>> odm.update(1, stats)  # the harder domain gets more
        tensor([0.5000, 0.5000], dtype=torch.float64)
        >>> odm.update(2, stats)[0] > 0.5
        tensor(True)
    """

    def __init__(
        self,
        num_domains: int,
        initial: Tensor | Sequence[float] | None = None,
        *,
        smoothing: float = 0.5,
        warmup_steps: int = 2000,
        update_every: int = 1,
    ) -> None:
        super().__init__(num_domains, initial)
        if not 0.0 <= smoothing < 1.0 or warmup_steps < 0 or update_every < 1:
            raise ValueError(
                f"ODM needs 0 <= smoothing < 1, warmup_steps >= 0, update_every >= 1; got {smoothing}, {warmup_steps}, {update_every}"
            )
        self.smoothing, self.warmup_steps, self.update_every = smoothing, warmup_steps, update_every
        self.rewards = torch.zeros(num_domains, dtype=torch.float64)
        self.eps = 1.0 / num_domains

    def update(self, step: int, stats: DomainStats, evaluate: Evaluate | None = None) -> Tensor:
        if step <= self.warmup_steps or step % self.update_every:
            return self.weights
        k = self.num_domains
        eps_prev, self.eps = self.eps, min(1.0 / k, math.sqrt(math.log(k) / (k * step)))
        present = stats.present
        a = self.smoothing
        self.rewards[present] = a * self.rewards[present] + (1 - a) * torch.exp(stats.losses[present].double())
        scaled = self.rewards * eps_prev
        w = scaled * ((1 - k * self.eps) / scaled.sum()) + self.eps
        self.weights = w / w.sum()
        return self.weights

    def _state(self) -> dict[str, Any]:
        return {"rewards": self.rewards.clone(), "eps": self.eps}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.rewards, self.eps = state["rewards"].clone(), float(state["eps"])


class DoReMi(MixingPolicy):
    """DoReMi online: exponentiated-gradient weights on each domain's excess loss over a reference model.

    Xie et al., "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining" (NeurIPS
    2023); authors' code ``sangmichaelxie/doremi``, ``doremi/trainer.py``,
    ``DoReMiTrainer.update_domain_weights`` (``doremi_optimizer="doremiv1"``), once per optimizer
    step over the tokens of every rank and accumulated micro-batch::

        s_d = mean over domain d's tokens of max(loss - reference_loss, 0)   (previous s_d if absent)
        w = softmax(log w + eta s),   w = (1 - c) w + c / K

    The per-sample signal is ``training_step``'s score ``"excess_loss"``: each sample's mean over its
    tokens of the clipped per-token excess (:func:`weightwise.mixing.excess_loss` computes it from
    token losses); the domain's token-weighted mean of those is the reference's token mean. The
    reference model's forward is a cost of this policy: the callback counts the tokens it scored
    (``weightwise/mixing/reference_tokens``).

    Defaults: ``eta = 1``; ``smoothing c = 1e-3``, the paper's and its run scripts'
    (``scripts/runs/run_pile_doremi120M.sh``: ``--reweight_eps 1e-3``; the dataclass default is 1e-4);
    the initial mixture uniform. Departure: the reference trains its proxy model on the natural
    mixture with the domain weights applied as *loss* weights and uses the averaged weights for a
    later run; weightwise (online mixing, as ODM compares with) draws the data by the current weights.

    Args:
        num_domains: K.
        initial: starting mixture.
        eta: the step size of the exponentiated-gradient update.
        smoothing: ``c``, the share of the uniform distribution mixed in (the guard against collapse).

    Attributes:
        scores: ``[K]`` the last per-domain excess losses.
        average: ``[K]`` the running mean of the weights (the reference's ``avg_domain_weights``,
            what DoReMi hands to the main run).

    Raises:
        ValueError: a non-positive ``eta`` or ``smoothing`` outside [0, 1].
    """

    score = "excess_loss"

    def __init__(
        self, num_domains: int, initial: Tensor | Sequence[float] | None = None, *, eta: float = 1.0, smoothing: float = 1e-3
    ) -> None:
        super().__init__(num_domains, initial)
        if eta <= 0 or not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"DoReMi needs eta > 0 and 0 <= smoothing <= 1, got eta={eta}, smoothing={smoothing}")
        self.eta, self.smoothing = eta, smoothing
        self.scores = torch.zeros(num_domains, dtype=torch.float64)
        self.average = self.weights.clone()
        self.updates = 0

    def update(self, step: int, stats: DomainStats, evaluate: Evaluate | None = None) -> Tensor:
        if self.score not in stats.scores:
            raise ValueError(
                "DoReMi needs each sample's excess loss over the reference model: return {'loss': losses, 'scores':"
                " {'excess_loss': weightwise.mixing.excess_loss(token_losses, reference_token_losses, mask)}} from"
                " training_step"
            )
        present = stats.present
        self.scores[present] = stats.scores[self.score][present].double()
        logits = torch.log(self.weights) + self.eta * self.scores
        w = torch.exp(logits - torch.logsumexp(logits, 0))
        self.weights = (1 - self.smoothing) * w + self.smoothing / self.num_domains
        self.updates += 1
        self.average = (self.average * (self.updates - 1) + self.weights) / self.updates
        return self.weights

    def _state(self) -> dict[str, Any]:
        return {"scores": self.scores.clone(), "average": self.average.clone(), "updates": self.updates}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.scores, self.average, self.updates = state["scores"].clone(), state["average"].clone(), int(state["updates"])


def clip_min_probability(probs: Tensor, min_prob: float) -> Tensor:
    """ADO's floor: rescale, raise every entry to ``min_prob``, renormalise (``src/data_selectors/ado.py``)."""
    deficit = max(min_prob * probs.numel() - float(probs.sum()), 0.0)
    scaled = probs * ((1 - deficit) / probs.sum())
    clipped = scaled.clamp(min=min_prob)
    return clipped / clipped.sum()


def savgol_smooth(values: Tensor, window: int, order: int) -> Tensor:
    """Savitzky-Golay smoothing along the last axis, with scipy's default ``mode="interp"`` edges
    (each edge's first/last ``window // 2`` points from a polynomial fit to the edge window)."""
    n = values.shape[-1]
    half = window // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    vander = torch.stack([x**p for p in range(order + 1)], 1)  # [W, order+1]
    centre = torch.linalg.pinv(vander)[0]  # the fitted polynomial's value at the window's centre
    out = torch.nn.functional.conv1d(values.reshape(-1, 1, n), centre.flip(0).reshape(1, 1, -1)).reshape(*values.shape[:-1], -1)
    out = torch.cat(
        [
            torch.empty(*values.shape[:-1], half, dtype=values.dtype),
            out,
            torch.empty(*values.shape[:-1], half, dtype=values.dtype),
        ],
        -1,
    )
    positions = torch.arange(window, dtype=torch.float64)
    edge = torch.stack([positions**p for p in range(order + 1)], 1)
    for start, rows in ((0, slice(0, half)), (n - window, slice(n - half, n))):
        coef = torch.linalg.lstsq(edge, values[..., start : start + window].transpose(-1, -2)).solution  # [order+1, M]
        fitted = (edge @ coef).transpose(-1, -2)  # [M, W]
        out[..., rows] = fitted[..., rows.start - start : rows.stop - start]
    return out


def fit_power_laws(counts: Tensor, losses: Tensor, *, grid_iterations: int = 30, keep: int = 4, iterations: int = 300) -> Tensor:
    """ADO's per-domain scaling law ``L(n) = exp(e) + exp(a) / n^alpha``, fitted to each domain's curve.

    The reference (``src/data_selectors/ado.py``, ``fit_scaling_law``) minimises the Huber loss
    (delta 1e-3) between ``log L`` and the law's ``logsumexp(a - alpha log n, e)`` plus penalties
    keeping ``alpha`` in [0, 0.8], ``a <= 6.5`` and ``e >= 0.5``, from every point of a grid of 512
    starting points (``a`` in -2..5, ``e`` in -2..1.5, ``alpha`` in 0..0.7) with jaxopt's L-BFGS
    (tol 1e-5, 200 iterations), and keeps the best. weightwise minimises the same objective from the
    same grid with torch's L-BFGS in two stages (a departure, for speed in one process): all starts
    together for ``grid_iterations``, then the ``keep`` best per domain for ``iterations``. The
    minima agree to the fit's tolerance, not bit for bit.

    Args:
        counts: ``[K, T]`` samples seen (``n``) at each point of the curve.
        losses: ``[K, T]`` the (smoothed) loss at each point.

    Returns:
        ``[K, 3]`` parameters ``(a, e, alpha)`` per domain.
    """
    grid = torch.cartesian_prod(
        torch.arange(-2.0, 6.0, 1.0, dtype=torch.float64),
        torch.arange(-2.0, 2.0, 0.5, dtype=torch.float64),
        torch.arange(0.0, 0.8, 0.1, dtype=torch.float64)[:8],
    )  # [G, 3]
    k = counts.shape[0]
    log_n = counts.double().log().unsqueeze(1)  # [K, 1, T]
    target = losses.double().log().unsqueeze(1)

    def objectives(params: Tensor) -> Tensor:  # [K, G, 3] -> [K, G]
        a, e, alpha = params[..., 0:1], params[..., 1:2], params[..., 2:3]
        pred = torch.logaddexp(a - alpha * log_n, e.expand(-1, -1, log_n.shape[-1]))
        diff = (target - pred).abs()
        huber = torch.where(diff > 1e-3, 1e-3 * (diff - 0.5e-3), 0.5 * diff**2).sum(-1)
        penalty = (alpha - 0.8).clamp(min=0) - alpha.clamp(max=0.001) + (a - 6.5).clamp(min=0) - (e - 0.5).clamp(max=0)
        values = huber + penalty.squeeze(-1)
        return torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))

    def minimise(start: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
        params = start.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [params],
            max_iter=max_iter,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            total = objectives(params).sum()
            total.backward()
            return total

        optimizer.step(closure)
        with torch.no_grad():
            return params.detach(), objectives(params)

    params, values = minimise(grid.unsqueeze(0).repeat(k, 1, 1), grid_iterations)
    best = values.topk(min(keep, grid.shape[0]), dim=1, largest=False).indices  # [K, keep]
    params, values = minimise(torch.gather(params, 1, best.unsqueeze(-1).expand(-1, -1, 3)), iterations)
    return params[torch.arange(k), values.argmin(1)]


def power_law(params: Tensor, n: Tensor) -> Tensor:
    """``exp(e) + exp(a) / n^alpha`` per domain (``params`` ``[K, 3]``, ``n`` ``[K]``)."""
    a, e, alpha = params.unbind(-1)
    return torch.exp(e) + torch.exp(a) / n**alpha


class ADO(MixingPolicy):
    """Adaptive Data Optimization: per-domain scaling laws, more data for domains still learning fast.

    Jiang et al., "Adaptive Data Optimization: Dynamic Sample Selection with Scaling Laws" (ICLR
    2025); authors' code ``yidingjiang/ado``, ``src/data_selectors/ado.py`` (``AdoSelector``) driven
    by ``src/dataloader/adaptive_loader.py``. Every step records each domain's mean loss (the previous
    value where a domain is absent) and the samples seen; from ``start_step`` on, every
    ``update_every`` steps, a scaling law ``L_d(n) = exp(e) + exp(a) n^-alpha`` is fitted to each
    domain's Savitzky-Golay-smoothed loss curve (:func:`fit_power_laws`, the first ``ignore_steps``
    left out, every 10th point). The policy is then, every step ``t``::

        slope_d = max(alpha_d, 0.05) (L_d(n) - exp(e_d)) / n          (how fast d's loss still falls)
        rho_d = slope_d * prior_d * sqrt(h_d (1 - h_d)),  rho = clip_min(rho / sum(rho), 1e-2)
        p = 0.9 avg + 0.1 rho,   avg = (1 - 1/(t+1)) avg + rho / (t+1)

    where ``h`` is a 0.9-moving average of the domains' shares of each batch, ``prior`` the initial
    (natural) mixture and ``n`` the samples seen (every domain counted with the whole batch, the
    reference's ``use_same_step_size``). Before the first fit the initial mixture is used.

    Defaults are the reference's Pile configuration (``configs/loader/pile_ado.yaml``): ``ignore_steps
    = start_step = 1000``, refits every 1000 steps (``update_interval``), smoothing window 101 of
    order 3, floor 1e-2. Departures: the fit (see :func:`fit_power_laws`); ``window`` may be set
    smaller for short runs (the reference's 101 needs 101 steps of history).

    Args:
        num_domains: K.
        initial: the prior and starting mixture (the reference: the natural token shares).
        ignore_steps, start_step, update_every, window, min_probability: see above.

    Attributes:
        params: ``[K, 3]`` the last fitted ``(a, e, alpha)``, or ``None`` before the first fit.

    Raises:
        ValueError: ``window`` even or below 5, or negative step counts.
    """

    def __init__(
        self,
        num_domains: int,
        initial: Tensor | Sequence[float] | None = None,
        *,
        ignore_steps: int = 1000,
        start_step: int = 1000,
        update_every: int = 1000,
        window: int = 101,
        min_probability: float = 1e-2,
    ) -> None:
        super().__init__(num_domains, initial)
        if window < 5 or window % 2 == 0 or min(ignore_steps, start_step) < 0 or update_every < 1:
            raise ValueError(f"ADO needs an odd window >= 5 and non-negative step counts, got window={window}")
        self.ignore_steps, self.start_step, self.update_every = ignore_steps, start_step, update_every
        self.window, self.min_probability = window, min_probability
        self.prior = self.weights.clone()
        self.history = self.weights.clone()  # p_history
        self.average = self.weights.clone()  # p_avg
        self.counts: list[Tensor] = []  # per step, [K] samples counted for each domain
        self.losses: list[Tensor] = []  # per step, [K] mean losses
        self.params: Tensor | None = None

    def record(self, stats: DomainStats) -> None:
        """The reference's ``update`` bookkeeping: the step's counts, batch shares and losses."""
        samples = stats.samples.double()
        self.counts.append(torch.full_like(samples, float(samples.sum())))
        self.history = 0.9 * self.history + 0.1 * samples / samples.sum()
        loss = stats.losses.double().clone()
        absent = ~stats.present
        if absent.any():
            batch_mean = float((loss[~absent] * samples[~absent]).sum() / samples[~absent].sum())  # over the samples
            fallback = self.losses[-1] if self.losses else torch.full_like(loss, batch_mean)
            loss[absent] = fallback[absent]
        self.losses.append(loss)

    def refit(self) -> None:
        cum = torch.stack(self.counts).cumsum(0).T  # [K, T]
        smoothed = savgol_smooth(torch.stack(self.losses).T, self.window, 3)
        params = fit_power_laws(cum[:, self.ignore_steps :: 10], smoothed[:, self.ignore_steps :: 10])
        if torch.isfinite(params).all():
            self.params = params

    def policy(self, step: int) -> Tensor:
        """The reference's ``curr_dist(itr)`` from the fitted parameters (updates the averages)."""
        assert self.params is not None
        irreducible = torch.exp(self.params[:, 1])
        exponent = self.params[:, 2].clamp(min=0.05)
        seen = torch.stack(self.counts).sum(0)
        current = power_law(self.params, seen)
        slope = exponent * (current - irreducible) / seen
        rho = slope * self.prior * (self.history * (1 - self.history)) ** 0.5
        rho = clip_min_probability(rho / rho.sum(), self.min_probability)
        p = 0.9 * self.average + 0.1 * rho
        self.average = (1 - 1 / (step + 1)) * self.average + rho / (step + 1)
        return p

    def update(self, step: int, stats: DomainStats, evaluate: Evaluate | None = None) -> Tensor:
        self.record(stats)
        if (
            step >= self.start_step
            and step % self.update_every == 0
            and len(self.losses) >= max(self.window, self.ignore_steps + 1)
        ):
            self.refit()
        if step >= self.start_step and self.params is not None:
            self.weights = self.policy(step)
        return self.weights

    def _state(self) -> dict[str, Any]:
        stack = lambda xs: torch.stack(xs) if xs else torch.empty(0, self.num_domains, dtype=torch.float64)  # noqa: E731
        return {
            "history": self.history.clone(), "average": self.average.clone(), "params": self.params,
            "counts": stack(self.counts), "losses": stack(self.losses),
        }  # fmt: skip

    def _load_state(self, state: dict[str, Any]) -> None:
        self.history, self.average, self.params = state["history"].clone(), state["average"].clone(), state["params"]
        self.counts, self.losses = list(state["counts"]), list(state["losses"])


class Aioli(MixingPolicy):
    """Aioli: estimate the linear mixing law from short probing runs, then exponentiated-gradient weights.

    Chen, Hu, Lourie, Cho, Ré, "Aioli: A unified optimization framework for language model data
    mixing" (arXiv 2411.05735, 2024); authors' code ``HazyResearch/aioli``, ``trainer/aioli_trainer.py``
    (``AioliTrainer.train`` and ``learn_params_subroutine``). Training is split into rounds of
    ``round_steps`` optimizer steps. Each round starts with LearnParams: for each domain ``j`` of
    ``lp_rounds`` random permutations of the domains, ``lp_steps`` steps on the mixture that gives
    ``j`` the share ``one_hot_factor`` (the rest split evenly); the held-out loss of every domain
    before and after each burst gives the column ``A[:, j] += L_before - L_after``. Then
    ``A /= lp_rounds``; with ``one_hot_factor < 1`` each row solves the linear system of the probing
    mixtures; ``A`` is normalised (shifted by its minimum if negative, divided by its sum), smoothed
    (``A_ema = (1 - ema) A + ema A_ema``), and the round trains on the rest of its steps with
    ``w ∝ exp(eta * A_ema.sum(0))``.

    Held-out losses come from the callback's ``evaluate`` (per-domain validation losses of the model
    as it is); each evaluation is a forward cost the callback counts. Defaults are the README's
    configuration (``scripts/*/aioli/run.sh``): ``lp_rounds=4``, ``lp_steps=4``, ``eta=0.2``,
    ``ema=0.1``, ``round_steps=250`` (``--update_steps``), ``one_hot_factor=0.625``,
    ``normalize=True`` (``--aioli_normalize_A``); ``main.py``'s argparse defaults differ (1, 5, no
    ema, 1.0). No floor: the reference has none (see the module docstring on collapse).

    Args:
        num_domains: K (at least 2).
        initial: the mixture before the first round's weights exist (the reference: uniform).
        lp_rounds, lp_steps, eta, ema, round_steps, one_hot_factor, normalize: see above.
        seed: seeds the LearnParams domain order (identical on every rank).

    Raises:
        ValueError: fewer than 2 domains, or a round too short for its LearnParams
            (``round_steps <= lp_rounds * lp_steps * K``).
    """

    def __init__(
        self,
        num_domains: int,
        initial: Tensor | Sequence[float] | None = None,
        *,
        lp_rounds: int = 4,
        lp_steps: int = 4,
        eta: float = 0.2,
        ema: float | None = 0.1,
        round_steps: int = 250,
        one_hot_factor: float = 0.625,
        normalize: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(num_domains, initial)
        if num_domains < 2 or round_steps <= lp_rounds * lp_steps * num_domains or not 0 < one_hot_factor <= 1:
            raise ValueError(
                f"Aioli needs K >= 2, 0 < one_hot_factor <= 1 and round_steps > lp_rounds * lp_steps * K"
                f" ({lp_rounds} * {lp_steps} * {num_domains}); got round_steps={round_steps}"
            )
        self.lp_rounds, self.lp_steps, self.eta, self.ema = lp_rounds, lp_steps, eta, ema
        self.round_steps, self.one_hot_factor, self.normalize, self.seed = round_steps, one_hot_factor, normalize, seed
        self.trained_weights = self.weights.clone()  # the round's mixture after LearnParams
        self.graph = torch.zeros(num_domains, num_domains, dtype=torch.float64)
        self.ema_graph: Tensor | None = None
        self.previous: Tensor | None = None  # held-out losses before the current burst
        self.rounds_done = 0
        self.evaluations = 0
        self.order = self._order(0)
        self.weights = self.probe(0)

    @property
    def lp_duration(self) -> int:
        return self.lp_rounds * self.lp_steps * self.num_domains

    def _order(self, round_index: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
        return torch.cat([torch.randperm(self.num_domains, generator=generator) for _ in range(self.lp_rounds)]).tolist()

    def probe(self, burst: int) -> Tensor:
        """The probing mixture of LearnParams burst ``burst``: ``one_hot_factor`` on its domain."""
        k = self.num_domains
        w = torch.full((k,), (1 - self.one_hot_factor) / (k - 1), dtype=torch.float64)
        w[self.order[burst]] = self.one_hot_factor
        return w

    def solve(self, graph: Tensor) -> Tensor:
        """``A`` from the probing differences: ``/ lp_rounds``, then each row through the probing mixtures."""
        graph = graph / self.lp_rounds
        if self.one_hot_factor != 1:
            k = self.num_domains
            mixtures = torch.full((k, k), (1 - self.one_hot_factor) / (k - 1), dtype=torch.float64)
            mixtures.fill_diagonal_(self.one_hot_factor)
            graph = torch.linalg.solve(mixtures, graph.T).T  # row i: solve(mixtures, graph[i])
        return graph

    def weights_from(self, graph: Tensor) -> Tensor:
        """Normalise, smooth and exponentiate ``A`` into the round's mixture."""
        if self.normalize:
            low = float(graph.min())
            if low < 0:
                graph = graph - low
            graph = graph / graph.sum()
        if self.ema is None:  # the reference multiplies each round's factor into the last round's weights
            w = torch.exp(self.eta * graph.sum(0)) * (self.trained_weights if self.rounds_done else 1.0)
            return w / w.sum()
        if self.ema_graph is not None:
            graph = (1 - self.ema) * graph + self.ema * self.ema_graph
        self.ema_graph = graph
        w = torch.exp(self.eta * graph.sum(0))
        return w / w.sum()

    def update(self, step: int, stats: DomainStats, evaluate: Evaluate | None = None) -> Tensor:
        position = (step - 1) % self.round_steps + 1  # steps done in this round, 1..round_steps
        if position > self.lp_duration:
            if position == self.round_steps:  # the round ends: the next begins with LearnParams, from here
                self.rounds_done += 1
                self.order, self.graph = self._order(self.rounds_done), torch.zeros_like(self.graph)
                self.previous = self._evaluate(self._required(evaluate))
                self.weights = self.probe(0)
            return self.weights
        if self.previous is None:
            raise RuntimeError("Aioli has no held-out losses to start its round from: call start(evaluate) before training")
        if position % self.lp_steps == 0:  # a burst ends: its column of A
            burst = position // self.lp_steps - 1
            losses = self._evaluate(self._required(evaluate))
            self.graph[:, self.order[burst]] += self.previous - losses
            self.previous = losses
            if position == self.lp_duration:
                self.trained_weights = self.weights_from(self.solve(self.graph))
                self.weights = self.trained_weights
            else:
                self.weights = self.probe(burst + 1)
        return self.weights

    def start(self, evaluate: Evaluate | None) -> None:
        if self.previous is None:  # a fresh run: the first round's LearnParams starts from here
            self.previous = self._evaluate(self._required(evaluate))

    @staticmethod
    def _required(evaluate: Evaluate | None) -> Evaluate:
        if evaluate is None:
            raise ValueError(
                "Aioli needs held-out per-domain losses: pass evaluate= to DomainMixing, e.g."
                " evaluate=weightwise.mixing.held_out_losses(val_loader, num_domains)"
            )
        return evaluate

    def _evaluate(self, evaluate: Evaluate) -> Tensor:
        self.evaluations += 1
        losses = torch.as_tensor(evaluate(), dtype=torch.float64).detach().cpu()
        if losses.shape != (self.num_domains,) or not torch.isfinite(losses).all():
            raise ValueError(f"evaluate() must return {self.num_domains} finite per-domain losses, got {losses.tolist()}")
        return losses

    def _state(self) -> dict[str, Any]:
        return {
            "graph": self.graph.clone(), "ema_graph": self.ema_graph, "previous": self.previous, "order": self.order,
            "rounds_done": self.rounds_done, "evaluations": self.evaluations, "trained_weights": self.trained_weights.clone(),
        }  # fmt: skip

    def _load_state(self, state: dict[str, Any]) -> None:
        self.graph, self.ema_graph, self.previous = state["graph"].clone(), state["ema_graph"], state["previous"]
        self.order, self.rounds_done, self.evaluations = (
            list(state["order"]),
            int(state["rounds_done"]),
            int(state["evaluations"]),
        )
        self.trained_weights = state["trained_weights"].clone()
