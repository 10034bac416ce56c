"""Per-domain statistics of a step, and the helpers that give every sample its domain and signals."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from weightwise.compute.meter import spending
from weightwise.core import collectives
from weightwise.mixing.policies import DomainStats
from weightwise.weighting.losses import reduce_token_losses


class StepAccumulator:
    """Sums a step's per-domain losses, tokens, samples and signals over its micro-batches.

    Every micro-batch adds its global batch (every rank's samples, gathered by the reducer), so the
    sums, and the :class:`DomainStats` made of them, are the same on every rank.
    """

    def __init__(self, num_domains: int, score_names: tuple[str, ...] = ()) -> None:
        self.num_domains, self.score_names = num_domains, score_names
        self.reset()

    def reset(self) -> None:
        zeros = lambda: torch.zeros(self.num_domains, dtype=torch.float64)  # noqa: E731
        self.loss_sums, self.weight_sums, self.samples, self.tokens = zeros(), zeros(), zeros(), zeros()
        self.score_sums = {name: zeros() for name in self.score_names}

    def add(self, domains: Tensor, losses: Tensor, tokens: Tensor | None, scores: Mapping[str, Tensor]) -> None:
        """Add one micro-batch: ``[B]`` domain ids, losses, token counts (``None``: one per sample) and signals."""
        domains = domains.long().cpu()
        weight = torch.ones_like(losses, dtype=torch.float64).cpu() if tokens is None else tokens.double().cpu()
        self.loss_sums.index_add_(0, domains, losses.double().cpu() * weight)
        self.weight_sums.index_add_(0, domains, weight)
        self.samples.index_add_(0, domains, torch.ones_like(weight))
        self.tokens.index_add_(0, domains, weight)
        for name in self.score_names:
            self.score_sums[name].index_add_(0, domains, scores[name].double().cpu() * weight)

    def stats(self) -> DomainStats:
        """The step's per-domain means (``nan`` for an absent domain)."""
        mean = lambda sums: torch.where(self.weight_sums > 0, sums / self.weight_sums.clamp(min=1e-300), float("nan"))  # noqa: E731
        scores = {name: mean(sums) for name, sums in self.score_sums.items()}
        return DomainStats(mean(self.loss_sums), self.samples.clone(), self.tokens.clone(), scores)

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sums": self.loss_sums, "weight_sums": self.weight_sums, "samples": self.samples, "tokens": self.tokens,
                "score_sums": self.score_sums}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sums, self.weight_sums = state["loss_sums"].clone(), state["weight_sums"].clone()
        self.samples, self.tokens = state["samples"].clone(), state["tokens"].clone()
        self.score_sums = {name: values.clone() for name, values in state["score_sums"].items()}


def excess_loss(token_losses: Tensor, reference_token_losses: Tensor, mask: Tensor, document_ids: Tensor | None = None) -> Tensor:
    """DoReMi's per-sample signal: the mean over a sample's valid tokens of ``max(loss - reference, 0)``.

    Clipping per token, then averaging, as ``sangmichaelxie/doremi`` (``doremi/trainer.py``,
    ``update_domain_weights``) does; a domain's token-weighted mean of these is its token mean.
    Samples are rows, or with ``document_ids`` the documents of packed rows (the order of
    :func:`weightwise.losses.reduce_token_losses`). Detached.

    Example::

        >>> import torch
        >>> excess_loss(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 3.0]]), torch.tensor([[True, True]]))
        tensor([0.5000])
    """
    clipped = (token_losses.detach().float() - reference_token_losses.detach().float()).clamp(min=0)
    return reduce_token_losses(clipped, mask, document_ids)[0]


def document_domains(row_domains: Tensor, mask: Tensor, document_ids: Tensor) -> Tensor:
    """Each packed document's domain from its row's: ``[B]`` row domains to one id per document with a
    valid token, in the order of :func:`weightwise.losses.reduce_token_losses` (rows packed from one
    domain, as :class:`~weightwise.mixing.MixingStream` yields them).

    Example::

        >>> import torch
        >>> document_domains(torch.tensor([3, 5]), torch.ones(2, 4, dtype=torch.bool), torch.tensor([[0, 0, 1, 1], [0, 1, 2, 2]]))
        tensor([3, 3, 5, 5, 5])
    """
    rows = row_domains.reshape(-1, 1).expand_as(mask).to(torch.float64)
    return reduce_token_losses(rows, mask, document_ids)[0].round().long()


def held_out_losses(
    loaders: Mapping[str, Iterable[Any]] | Iterable[Iterable[Any]],
    loss_fn: Callable[[torch.nn.Module, Any], Tensor],
    module: torch.nn.Module,
) -> Callable[[], Tensor]:
    """An ``evaluate`` for Aioli: each domain's mean held-out loss, over every rank's share.

    Args:
        loaders: one held-out loader per domain (each rank passes its own share of the data).
        loss_fn: ``loss_fn(module, batch)`` gives the batch's per-sample losses ``[B]``.
        module: the model (put in eval mode and back, under ``torch.no_grad``).

    Returns:
        a callable returning ``[K]`` mean losses, identical on every rank (sums all-reduced; every
        rank must call it at the same step, as the callback does). Under
        :class:`~weightwise.callbacks.ComputeBudget` its forwards count as ``"probes"``.
    """
    domains = list(loaders.values()) if isinstance(loaders, Mapping) else list(loaders)

    def evaluate() -> Tensor:
        was_training = module.training
        module.eval()
        device = next(module.parameters()).device
        totals = torch.zeros(2 * len(domains), dtype=torch.float64, device=device)
        try:
            with torch.no_grad(), spending("probes"):
                for d, loader in enumerate(domains):
                    for batch in loader:
                        losses = loss_fn(module, batch).detach().double()
                        totals[2 * d] += losses.sum()
                        totals[2 * d + 1] += losses.numel()
        finally:
            module.train(was_training)
        totals = collectives.all_reduce_sum(totals).cpu()
        return totals[0::2] / totals[1::2].clamp(min=1)

    return evaluate
