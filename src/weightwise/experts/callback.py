"""``ExpertUpcycling``: grow a Mixture-of-Experts from E to m·E experts in the middle of ``fit``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from weightwise.core.checkpoints import state_version, with_version
from weightwise.experts.adapters import find_moe_blocks
from weightwise.experts.resume import RestructuringCallback
from weightwise.experts.strategies import require_mid_fit_upcycling, transformers_model
from weightwise.experts.surgery import Method, NoiseTarget, Selection, StateHandling, UpcycleReport, upcycle_experts
from weightwise.experts.utility import METRICS, PROJECTIONS, Allocation, ExpertUtility, Metric, Projection
from weightwise.integrations.lightning import rewrap_ddp
from weightwise.reporting.histograms import log_histogram

DEFAULT_UTILITY_WINDOW = 20
"""Optimizer steps of utility averaged before the surgery when ``utility_window`` is not given."""


class ExpertUpcycling(RestructuringCallback):
    """At optimizer step ``at_step``, upcycle every MoE block of the model (see :mod:`weightwise.experts`).

    * With ``selection="utility"`` (the default with ``method="duplicate"``, as the reference
      allocates copies), expert utilities (``||grad||^2`` of each expert's gate/up
      projection by default: the gradient-based score the reference's README recommends; its
      configuration's default is ``weight_norm``, available as ``utility_metric``) are averaged over the ``utility_window`` optimizer
      steps before ``at_step`` - measured on the gradients the optimizer applies, so accumulated and
      averaged over ranks, the same on every rank - and turned into per-expert copy counts by the
      reference's greedy allocation (:mod:`weightwise.experts.utility`). The reference scores the
      single step before the surgery (``utility_window=1``).
    * The surgery is in place: parameters keep their identity, the optimizer's Adam moments are
      remapped to the copies and the LR schedule simply continues. Under DDP the model is wrapped
      anew so gradient buckets match the new shapes; every rank does the same surgery (the
      router noise is seeded by ``seed``).
    * When the batch is a mapping the model accepts (``input_ids``, ``labels``, ...), the model's
      loss on that batch is measured right before and right after the surgery
      (``weightwise/upcycle_loss_before|after``), and the routers' expert load before and after is
      logged (``weightwise/expert_load_*``) - the size of the function jump is visible, not assumed.
    * Under DeepSpeed, ``ModelParallelStrategy`` (FSDP2) and FSDP the parameters and their optimizer
      state are sharded when the fit starts, so the callback refuses at fit start with the command
      that upcycles between two fits instead (``weightwise upcycle MODEL_DIR GROWN_DIR --checkpoint
      CKPT --factor m``, filled in with the trainer's checkpoint directory and the model's prefix;
      the offline copies follow the weight-norm utility, the reference configuration's metric, as
      no gradients are at hand). The next fit loads the grown model with ``from_pretrained`` and a
      fresh optimizer, as the reference's pipeline continues pre-training with fresh optimizer state.

    Args:
        at_step: global step at which to grow the experts.
        factor, method, noise_target, preserve_function, optimizer_state, allocation, cap: see
            :func:`weightwise.experts.upcycle_experts`.
        selection: ``"utility"`` (copies by measured utility, the reference's; the default with
            ``method="duplicate"``) or ``"uniform"`` (m copies each; the default, and the only choice,
            with ``"granular"``, which splits every expert alike). :func:`~weightwise.experts.upcycle_experts`
            and ``weightwise upcycle`` default to ``"uniform"``: they see no gradients.
        router_noise: see :func:`~weightwise.experts.upcycle_experts`. Its default there is 0 (the
            reference's plain router copy); here 1e-2, because copies that keep training inside a
            fit must receive different tokens to grow apart - identical router rows tie forever.
        utility_window: optimizer steps before ``at_step`` over which utility is averaged (default:
            20, or ``at_step`` when that is earlier; the reference scores 1).
        utility_metric, utility_projection: see :class:`weightwise.experts.ExpertUtility`.
        seed: seed of the router noise (identical on every rank).

    Raises:
        ValueError: a bad setting, found at construction rather than when ``at_step`` arrives.
        MisconfigurationException: at fit start, a sharding strategy (the message is the command to
            upcycle between fits), another unsupported strategy, or several optimizers.

    Example::

        >>> import lightning.pytorch as pl
        >>> from weightwise.callbacks import ExpertUpcycling
        >>> upcycling = ExpertUpcycling(at_step=5_000, factor=2)  # 8 -> 16 experts, copies by utility
        >>> upcycling.selection, upcycling.utility_window
        ('utility', 20)
        >>> trainer = pl.Trainer(callbacks=[upcycling], logger=False)
    """

    STATE_VERSION = 1

    def __init__(
        self,
        at_step: int,
        factor: int = 2,
        *,
        method: Method = "duplicate",
        selection: Selection | None = None,
        router_noise: float = 1e-2,
        noise_target: NoiseTarget = "weight",
        utility_window: int | None = None,
        utility_metric: Metric = "gradient_squared",
        utility_projection: Projection = "gate_up",
        allocation: Allocation = "greedy",
        cap: int = 3,
        preserve_function: bool = True,
        optimizer_state: StateHandling = "copy",
        seed: int = 0,
    ) -> None:
        if at_step < 1:
            raise ValueError(f"at_step must be >= 1, got {at_step}")
        if not isinstance(factor, int) or factor < 2:
            raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
        if method not in ("duplicate", "granular"):
            raise ValueError(f"method must be 'duplicate' or 'granular', got {method!r}")
        if selection is None:
            selection = "utility" if method == "duplicate" else "uniform"
        if utility_window is None:
            utility_window = min(DEFAULT_UTILITY_WINDOW, at_step)
        if selection not in ("uniform", "utility"):
            raise ValueError(f"selection must be 'uniform' or 'utility', got {selection!r}")
        if selection == "utility" and method != "duplicate":
            raise ValueError("selection='utility' needs method='duplicate' (granular splits every expert alike)")
        if selection == "utility" and not 1 <= utility_window <= at_step:
            raise ValueError(f"selection='utility' needs 1 <= utility_window <= at_step, got {utility_window} and {at_step}")
        if router_noise < 0:
            raise ValueError(f"router_noise must be >= 0, got {router_noise}")
        if utility_metric not in METRICS:
            raise ValueError(f"utility_metric must be one of {METRICS}, got {utility_metric!r}")
        if utility_projection not in PROJECTIONS:
            raise ValueError(f"utility_projection must be one of {sorted(PROJECTIONS)}, got {utility_projection!r}")
        if allocation not in ("greedy", "proportional") or cap < 1:
            raise ValueError(f"allocation must be 'greedy' or 'proportional' and cap >= 1, got {allocation!r}, {cap}")
        if noise_target not in ("weight", "bias") or optimizer_state not in ("copy", "reset"):
            raise ValueError(
                f"noise_target must be 'weight' or 'bias' and optimizer_state 'copy' or 'reset', got {noise_target!r},"
                f" {optimizer_state!r}"
            )
        self.at_step = at_step
        self.factor = factor
        self.method: Method = method
        self.selection: Selection = selection
        self.router_noise = router_noise
        self.noise_target: NoiseTarget = noise_target
        self.utility_window = utility_window
        self.utility_metric: Metric = utility_metric
        self.utility_projection: Projection = utility_projection
        self.allocation: Allocation = allocation
        self.cap = cap
        self.preserve_function = preserve_function
        self.optimizer_state: StateHandling = optimizer_state
        self.seed = seed
        self.done = False
        self.report: UpcycleReport | None = None
        self.measurements: dict[str, dict[str, Any] | None] = {}
        self.utility: ExpertUtility | None = None
        self._pending_utility: dict | None = None

    # ------------------------------------------------------------------ resume
    @override
    def restructure(self, pl_module: pl.LightningModule) -> None:
        upcycle_experts(pl_module, self.factor, method=self.method)  # the shapes; the values are loaded next

    # ------------------------------------------------------------------ utility window
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        options = f"--factor {self.factor} --method {self.method}"
        if self.method == "duplicate":
            weight_norm = f" --selection weight-norm --cap {self.cap}" if self.selection == "utility" else ""
            options += f"{weight_norm} --router-noise {self.router_noise} --seed {self.seed}"
        require_mid_fit_upcycling(trainer, "ExpertUpcycling", transformers_model(pl_module), options)
        if len(trainer.optimizers) > 1:
            raise MisconfigurationException("ExpertUpcycling supports one optimizer")
        if not self.done:
            self.utility = ExpertUtility(find_moe_blocks(pl_module), self.utility_metric, self.utility_projection)
            if self._pending_utility is not None:
                self.utility.load_state_dict(self._pending_utility)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        # Here the gradients are those the optimizer applies: accumulated over the micro-batches and,
        # under DDP, averaged over the ranks - the same on every rank, so every rank counts the same
        # utility and makes the same copies. (After each backward they are one rank's micro-batch.)
        in_window = self.at_step - self.utility_window <= trainer.global_step < self.at_step
        if self.selection == "utility" and not self.done and in_window and self.utility is not None:
            self.utility.accumulate(optimizer)

    # ------------------------------------------------------------------ surgery
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.done or trainer.global_step < self.at_step:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        before = self._measure(pl_module, batch)
        utility = self.utility.averages if self.selection == "utility" and self.utility is not None else None
        self.report = upcycle_experts(
            pl_module,
            self.factor,
            method=self.method,
            selection=self.selection,
            utility=utility,
            allocation=self.allocation,
            cap=self.cap,
            router_noise=self.router_noise,
            noise_target=self.noise_target,
            preserve_function=self.preserve_function,
            optimizer=optimizer,
            optimizer_state=self.optimizer_state,
            generator=torch.Generator().manual_seed(self.seed),
        )
        rewrap_ddp(trainer)  # DDP's gradient buckets were laid out for the old shapes
        self.done = True
        after = self._measure(pl_module, batch)
        self._log(trainer, pl_module, before, after)

    @staticmethod
    def _measure(pl_module: pl.LightningModule, batch: Any) -> dict[str, Any] | None:
        """Loss of the model on ``batch`` and its routers' expert load (eval mode, no grad)."""
        from transformers import (
            PreTrainedModel,  # lazily: importing weightwise costs no transformers
        )

        model = next((m for m in pl_module.modules() if isinstance(m, PreTrainedModel)), None)
        if model is None or not isinstance(batch, Mapping) or "input_ids" not in batch:
            return None
        blocks = list(find_moe_blocks(model).values())
        loads: list[Tensor] = []
        hooks = [block.block.gate.register_forward_hook(lambda mod, args, out: loads.append(out[-1].flatten())) for block in blocks]
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                loss = model(**inputs).loss
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        load = torch.bincount(torch.cat(loads).cpu(), minlength=blocks[0].num_experts).float()
        return {"loss": None if loss is None else float(loss), "load": load / load.sum()}

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, before: dict | None, after: dict | None) -> None:
        metrics: dict[str, float] = {"weightwise/num_experts": float(self.report.num_experts[1])}
        for name, measured in (("before", before), ("after", after)):
            if measured is None:
                continue
            if measured["loss"] is not None:
                metrics[f"weightwise/upcycle_loss_{name}"] = measured["loss"]
            metrics[f"weightwise/expert_load_max_{name}"] = float(measured["load"].max())
            log_histogram(trainer, f"weightwise/expert_load_{name}", measured["load"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.measurements = {"before": before, "after": after}

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return with_version({"done": self.done, "utility": None if self.utility is None else self.utility.state_dict()}, self.STATE_VERSION)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_version(state_dict, "ExpertUpcycling", self.STATE_VERSION)
        self.done = bool(state_dict["done"])
        self._pending_utility = state_dict["utility"]
