"""``DomainMixing``: the thin Lightning callback that learns the data mixture while the model trains."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from weightwise.core import collectives
from weightwise.core.checkpoints import state_version, with_version
from weightwise.core.ids import SAMPLE_ID_KEY
from weightwise.integrations.lightning import is_logging_step
from weightwise.mixing.domains import StepAccumulator
from weightwise.mixing.policies import Evaluate, MixingPolicy, check_weights
from weightwise.mixing.sampler import MixtureBatchSampler
from weightwise.mixing.stream import MixingStream
from weightwise.mixing.table import WeightTable
from weightwise.weighting.callback import SampleWeightCallback
from weightwise.weighting.losses import TokenWeighting
from weightwise.weighting.reducer import NonFinitePolicy


class DomainMixing(SampleWeightCallback):
    """Learn the domain mixture online: a policy moves the weights, the loader draws by them.

    After every optimizer step the callback hands the policy (:mod:`weightwise.mixing.policies`:
    ``ODM``, ``ADO``, ``Aioli``, ``DoReMi``, ``FixedMixture``) each domain's loss over the step's
    global batch - every rank's samples and every accumulated micro-batch, token-weighted when
    ``training_step`` gives token losses or counts, so every rank decides the same weights - and
    publishes the new mixture to the data ``source``:

    * a :class:`~weightwise.mixing.MixtureBatchSampler` over map-style data (each sample's domain is
      looked up by its dataset index: wrap the dataset in ``weightwise.IndexedDataset``), or
    * a :class:`~weightwise.mixing.MixingStream` of one iterable per domain (each item carries its
      domain id under ``source.domain_key``; packed documents: return ``"domain_ids"`` from
      ``training_step``, see :func:`~weightwise.mixing.document_domains`).

    The mixture reaches the loader at known step boundaries: micro-batch ``k`` is drawn with the
    weights after ``k - delay`` micro-batches (:mod:`weightwise.mixing.table`), through shared memory
    for DataLoader workers. The default ``delay=1`` suits ``num_workers=0`` (Lightning fetches one
    batch ahead); a sampler under ``num_workers=W`` needs ``1 + W * prefetch_factor`` (checked at fit
    start), a stream's workers wait for a version not yet published (correct, but they stop
    prefetching: give the same delay for full speed). The draw is then independent of timing, and a resumed run
    (policy state, weights, sampler cursors or stream positions, the token ledger, all in the
    checkpoint) draws exactly the batches the uninterrupted one would have.

    The callback contributes no loss weight (factor 1): mixing changes which data is drawn, and
    composes with :class:`~weightwise.callbacks.LossReweighting` and the other weight contributors.

    Monitoring (on Lightning's logging steps - ``log_every_n_steps=1`` for every step):
    ``weightwise/domain_weight/<name>``, ``weightwise/domain_tokens/<name>`` (tokens trained per
    domain so far; samples where the step gives no token counts), and
    ``weightwise/mixing/max_weight``; DoReMi's reference-model tokens
    (``weightwise/mixing/reference_tokens``) and Aioli's held-out evaluations
    (``weightwise/mixing/evaluations``) count the extra forwards. :attr:`ledger` keeps the token
    and sample counts per domain.

    Guards: a sample without a domain or with an unknown id stops the step with an error naming the
    fix; non-finite weights raise ``FloatingPointError``; ``min_weight`` floors every domain's
    weight in the draw (``w <- (1 - K m) w + m``, the policy's own state untouched); when one
    domain's weight passes ``collapse_threshold`` the callback warns once and logs
    ``weightwise/mixing/collapsed`` (1 while it lasts).

    Args:
        policy: the mixing policy.
        source: the sampler or stream the training data is drawn through.
        delay: micro-batches between a mixture's decision and its first draw (see above).
        evaluate: per-domain held-out losses for policies that probe (Aioli;
            :func:`~weightwise.mixing.held_out_losses`).
        min_weight: the floor (0 by default: the policy's own guard, if any).
        collapse_threshold: the weight above which one domain counts as collapsed.
        nonfinite, sample_id_key, token_weighting: see :class:`~weightwise.callbacks.SampleWeightCallback`.

    Attributes:
        weights: ``[K]`` the mixture being drawn now (after the floor).
        ledger: ``{"tokens": [K], "samples": [K]}`` trained per domain.

    Raises:
        ValueError: a policy and a source over different numbers of domains, ``min_weight`` too
            large (``K * min_weight >= 1``), a threshold outside (0, 1]; at fit start, a loader that
            does not use the source, ``persistent_workers``, a batch size other than the stream's.

    Example::

        >>> from weightwise.mixing import MixtureBatchSampler, ODM
        >>> sampler = MixtureBatchSampler([0, 0, 1, 1, 1, 1], batch_size=2)
        >>> mixing = DomainMixing(ODM(2, sampler.sizes, warmup_steps=0), sampler)
        >>> mixing.weights
        tensor([0.3333, 0.6667], dtype=torch.float64)
    """

    STATE_VERSION = 1

    def __init__(
        self,
        policy: MixingPolicy,
        source: MixtureBatchSampler | MixingStream,
        *,
        delay: int = 1,
        evaluate: Evaluate | None = None,
        min_weight: float = 0.0,
        collapse_threshold: float = 0.95,
        nonfinite: NonFinitePolicy = "raise",
        sample_id_key: str = SAMPLE_ID_KEY,
        token_weighting: TokenWeighting = "rank",
    ) -> None:
        super().__init__(nonfinite=nonfinite, sample_id_key=sample_id_key, token_weighting=token_weighting)
        if not isinstance(source, (MixtureBatchSampler, MixingStream)):
            raise TypeError(f"source must be a MixtureBatchSampler or a MixingStream, got {type(source).__name__}")
        k = policy.num_domains
        if source.num_domains != k:
            raise ValueError(f"the policy mixes {k} domains, the source has {source.num_domains}")
        if not 0 <= min_weight * k < 1 or not 0 < collapse_threshold <= 1:
            raise ValueError(
                f"need 0 <= min_weight < 1/K (K={k}) and 0 < collapse_threshold <= 1, got {min_weight}, {collapse_threshold}"
            )
        self.policy, self.source, self.evaluate = policy, source, evaluate
        self.min_weight, self.collapse_threshold = min_weight, collapse_threshold
        self.names = list(source.names)
        self.mapped = isinstance(source, MixtureBatchSampler)
        self.needs_sample_ids = self.mapped  # map-style: the domain is looked up by dataset index
        self.domain_key: str | None = None if self.mapped else source.domain_key  # streams: the batch carries it
        self.accumulator = StepAccumulator(k, (policy.score,) if policy.score else ())
        self.ledger = {"tokens": torch.zeros(k, dtype=torch.float64), "samples": torch.zeros(k, dtype=torch.float64)}
        self.reference_tokens = 0.0
        self.weights = self._floored(policy.weights)
        self.trained = 0  # micro-batches trained in this fit (resumes included)
        # The loader may draw its first batches before any hook of the fit runs (Lightning fetches
        # one at data setup), so the source reads this table from the start.
        self.table = WeightTable(self.weights, delay=delay)
        self.table.live = True
        source.table = self.table
        self._last_step = 0
        self._collapsed = False
        self._warned = False
        self._fresh = True

    # ------------------------------------------------------------------ fit start
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        loader = trainer.train_dataloader
        uses = getattr(loader, "batch_sampler", None) is self.source or getattr(loader, "dataset", None) is self.source
        if not uses:
            raise ValueError(
                "DomainMixing's source is not the training loader's: pass DataLoader(IndexedDataset(data),"
                " batch_sampler=sampler) or DataLoader(stream, batch_size=stream.batch_size), and"
                " Trainer(use_distributed_sampler=False) for the sampler"
            )
        workers = int(getattr(loader, "num_workers", 0))
        if workers and getattr(loader, "persistent_workers", False):
            raise ValueError("DomainMixing needs persistent_workers=False: workers must restart from the trained positions")
        in_flight = 1 + workers * (getattr(loader, "prefetch_factor", None) or 2)
        if self.mapped and self.table.delay < in_flight:
            raise ValueError(
                f"the sampler draws up to {in_flight} batches ahead (1 + num_workers * prefetch_factor) but the mixture"
                f" reaches the draw after delay={self.table.delay}: pass DomainMixing(delay={in_flight})"
            )
        if not self.mapped:
            if loader.batch_size != self.source.batch_size:
                raise ValueError(
                    f"the DataLoader's batch_size ({loader.batch_size}) must be the stream's ({self.source.batch_size})"
                )
            self.source.bind(workers, self.trained, self.source.positions)
        if self._fresh:
            self.policy.start(self.evaluate)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.mapped:  # the epoch's iterator starts its workers from the trained positions
            self.source.bind(self.source.slots, self.trained, self.source.positions)

    # ------------------------------------------------------------------ every micro-batch
    @override
    def sample_weights(self, losses: Tensor, sample_ids: Tensor | None, trainer: pl.Trainer) -> Tensor | None:
        assert self.reducer is not None
        step = self.reducer.step
        if self.mapped:
            assert sample_ids is not None  # needs_sample_ids: the reducer refuses batches without them
            ids = sample_ids.long().cpu()
            if int(ids.max()) >= self.source.domains.numel() or int(ids.min()) < 0:
                raise ValueError(
                    f"sample ids {ids.tolist()[:10]} lie outside the sampler's {self.source.domains.numel()} domain ids"
                )
            domains = self.source.domains[ids]
        else:
            assert step.domain_ids is not None  # the reducer reads them for a contributor with a domain_key
            domains = step.domain_ids.long().cpu()
        unknown = (domains < 0) | (domains >= self.policy.num_domains)
        if unknown.any():
            raise ValueError(
                f"unknown domain ids {domains[unknown].unique().tolist()[:10]}: the mixture has {self.policy.num_domains} domains"
                f" {self.names}; ids must lie in [0, {self.policy.num_domains})"
            )
        if self.policy.score and self.policy.score in step.scores:
            self.reference_tokens += float(step.tokens.sum()) if step.tokens is not None else float(losses.numel())
        self.accumulator.add(domains, losses, step.tokens, step.scores)
        return None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.mapped:
            self._count_stream_items(batch)
        self.trained += 1
        if trainer.global_step != self._last_step:  # an optimizer step ended with this micro-batch
            self._last_step = trainer.global_step
            stats = self.accumulator.stats()
            self.ledger["tokens"] += stats.tokens
            self.ledger["samples"] += stats.samples
            self.accumulator.reset()
            self.weights = self._guard(self.policy.update(trainer.global_step, stats, self.evaluate))
        self.table.publish(self.trained, self.weights)
        if self.mapped:
            self.source.release(self.trained)
        self._log(trainer, pl_module)

    def _count_stream_items(self, batch: Any) -> None:
        domains = batch[self.domain_key] if isinstance(batch, Mapping) else None
        if not isinstance(domains, Tensor):
            raise ValueError(f"the stream's batch lost its {self.domain_key!r} key; keep it in the collated batch")
        slot = self.trained % self.source.slots  # batch k belongs to slot k mod W (MixingStream)
        self.source.positions[slot] += torch.bincount(domains.long().cpu(), minlength=self.policy.num_domains)

    def _floored(self, weights: Tensor) -> Tensor:
        w = check_weights(weights, self.policy.num_domains, "mixture weights")
        return w if self.min_weight == 0 else (1 - self.policy.num_domains * self.min_weight) * w + self.min_weight

    def _guard(self, weights: Tensor) -> Tensor:
        w = self._floored(weights)
        self._collapsed = float(w.max()) > self.collapse_threshold
        if self._collapsed and not self._warned:
            self._warned = True
            top = int(w.argmax())
            rank_zero_warn(
                f"the domain mixture collapsed onto {self.names[top]!r} (weight {float(w[top]):.4f} > collapse_threshold="
                f"{self.collapse_threshold}); the other domains get almost no data and no signal to recover. Raise"
                " DomainMixing(min_weight=...) or the policy's own smoothing."
            )
        return w

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_logging_step(trainer):
            return
        metrics = {f"weightwise/domain_weight/{n}": float(w) for n, w in zip(self.names, self.weights)}
        metrics.update({f"weightwise/domain_tokens/{n}": float(t) for n, t in zip(self.names, self.ledger["tokens"])})
        metrics["weightwise/mixing/max_weight"] = float(self.weights.max())
        metrics["weightwise/mixing/collapsed"] = float(self._collapsed)
        if self.policy.score:
            metrics["weightwise/mixing/reference_tokens"] = self.reference_tokens
        if hasattr(self.policy, "evaluations"):
            metrics["weightwise/mixing/evaluations"] = float(self.policy.evaluations)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)  # identical on every rank

    # ------------------------------------------------------------------ checkpoints (docs/architecture.md, contract 4)
    def _source_state(self) -> dict[str, Any]:
        """Every rank's cursor (they differ: each rank draws its own data), gathered in rank order."""
        if self.mapped:
            mine = self.source.state_at(self.trained)
            flat = torch.cat([mine["passes"], mine["positions"], mine["dropped"].long()])
            gathered, _ = collectives.all_gather_variable(flat)
            k = self.policy.num_domains
            per_rank = gathered[0].reshape(-1, 3, k)
            return {"batch": self.trained, "seed": mine["seed"], "num_samples": mine["num_samples"], "cursors": per_rank}
        gathered, _ = collectives.all_gather_variable(self.source.positions.flatten())
        return {"slots": self.source.slots, "positions": gathered[0].reshape(-1, *self.source.positions.shape)}

    def _load_source(self, state: dict[str, Any]) -> None:
        rank = collectives.rank()
        if self.mapped:
            passes, positions, dropped = state["cursors"][rank]
            self.source.load_state(
                {"batch": state["batch"], "seed": state["seed"], "num_samples": state["num_samples"],
                 "passes": passes, "positions": positions, "dropped": dropped.bool()}
            )  # fmt: skip
        else:
            self.source.bind(int(state["slots"]), self.trained, state["positions"][rank])

    @override
    def state_dict(self) -> dict[str, Any]:
        return with_version(
            {
                "policy": self.policy.state_dict(), "table": self.table.state_dict(), "source": self._source_state(),
                "trained": self.trained, "last_step": self._last_step, "weights": self.weights.clone(),
                "ledger": {k: v.clone() for k, v in self.ledger.items()}, "reference_tokens": self.reference_tokens,
                "accumulator": self.accumulator.state_dict(), "names": self.names,
            },
            self.STATE_VERSION,
        )  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_version(state_dict, "DomainMixing", self.STATE_VERSION)
        if list(state_dict["names"]) != self.names:
            raise ValueError(
                f"the checkpoint mixed domains {state_dict['names']}, this run {self.names}; resume with the same domains"
            )
        self.policy.load_state_dict(state_dict["policy"])
        self.trained, self._last_step = int(state_dict["trained"]), int(state_dict["last_step"])
        self.weights = state_dict["weights"].clone()
        self.ledger = {k: v.clone() for k, v in state_dict["ledger"].items()}
        self.reference_tokens = float(state_dict["reference_tokens"])
        self.accumulator.load_state_dict(state_dict["accumulator"])
        # Restored before the fit loop sets up the data, so the loader's first draw already continues the run.
        self.table.load_state_dict(state_dict["table"])
        self._load_source(state_dict["source"])
        self._fresh = False
