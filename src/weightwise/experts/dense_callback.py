"""``DenseUpcycling``: turn a dense transformers model into a Mixture-of-Experts in the middle of ``fit``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from weightwise.core.checkpoints import state_version, with_version
from weightwise.experts.dense import TARGETS, DenseMethod, DenseState, DenseUpcycleReport, check_dense_settings, upcycle_dense
from weightwise.experts.resume import RestructuringCallback
from weightwise.experts.strategies import require_mid_fit_upcycling
from weightwise.integrations.lightning import rewrap_ddp


class DenseUpcycling(RestructuringCallback):
    """At optimizer step ``at_step``, replace the LightningModule's dense transformers model (Llama,
    Mistral, Qwen2, Qwen3) by its MoE upcycling (:func:`weightwise.experts.upcycle_dense`).

    * The new model (Mixtral, Qwen2-MoE or Qwen3-MoE) takes the dense model's place in the module
      (``attribute``, found automatically when the module holds one transformers model) and shares
      every non-MLP parameter with it, so the optimizer keeps their state; in the optimizer the dense
      MLP parameters are replaced by the experts and routers, in their param group and position, so
      the LR schedule simply continues. Their state follows ``optimizer_state`` (fresh by default, as
      every reference starts the MoE phase with a new optimizer).
    * Under DDP the module is wrapped anew (its reducer was built for the dense parameters); every
      rank draws the same routers and re-initialised units (``seed``).
    * With a mapping batch the model accepts, the loss right before and after is logged
      (``weightwise/upcycle_loss_before|after``): exact for ``"copy"`` and ``"granular"``.
    * DeepSpeed, ``ModelParallelStrategy`` (FSDP2) and FSDP shard the parameters and their optimizer
      state when the fit starts: the callback refuses at fit start with the command that upcycles
      between two fits instead (``weightwise upcycle --from-dense MODEL_DIR MOE_DIR --checkpoint CKPT
      --experts E --top-k K``, with the trainer's checkpoint directory and the model's prefix); the
      next fit trains the MoE from ``from_pretrained`` with a fresh optimizer, as the references do.

    Args:
        at_step: global step at which to upcycle.
        num_experts, top_k, method, granularity, drop_ratio, optimizer_state: see
            :func:`~weightwise.experts.upcycle_dense`.
        attribute: dotted path of the dense model in the LightningModule (default: the one
            transformers model found in it).
        seed: seed of the router and Drop-Upcycling draws (identical on every rank).

    Raises:
        ValueError: a bad setting, found at construction.
        MisconfigurationException: at fit start, no single dense model to upcycle, a sharding
            strategy (the message is the command to upcycle between fits), another unsupported
            strategy, or several optimizers.

    Example::

        >>> import lightning.pytorch as pl
        >>> from weightwise.callbacks import DenseUpcycling
        >>> upcycling = DenseUpcycling(at_step=1_000, num_experts=8, top_k=2, method="drop")
        >>> upcycling.drop_ratio
        0.5
        >>> trainer = pl.Trainer(callbacks=[upcycling], logger=False)
    """

    STATE_VERSION = 1

    def __init__(
        self,
        at_step: int,
        num_experts: int = 8,
        top_k: int = 2,
        *,
        method: DenseMethod = "copy",
        granularity: int | None = None,
        drop_ratio: float = 0.5,
        optimizer_state: DenseState = "reset",
        attribute: str | None = None,
        seed: int = 0,
    ) -> None:
        if at_step < 1:
            raise ValueError(f"at_step must be >= 1, got {at_step}")
        granularity = check_dense_settings(num_experts, top_k, method, granularity, drop_ratio, optimizer_state)
        self.at_step = at_step
        self.num_experts = num_experts
        self.top_k = top_k
        self.method: DenseMethod = method
        self.granularity = granularity
        self.drop_ratio = drop_ratio
        self.optimizer_state: DenseState = optimizer_state
        self.attribute = attribute
        self.seed = seed
        self.done = False
        self.report: DenseUpcycleReport | None = None
        self.losses: dict[str, float | None] = {}

    def _upcycle(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer | None) -> nn.Module:
        path, dense = self._locate(pl_module)
        moe = upcycle_dense(
            dense,
            self.num_experts,
            self.top_k,
            method=self.method,
            granularity=self.granularity,
            drop_ratio=self.drop_ratio,
            optimizer=optimizer,
            optimizer_state=self.optimizer_state,
            generator=torch.Generator().manual_seed(self.seed),
        )
        parent_path, _, name = path.rpartition(".")
        setattr(pl_module.get_submodule(parent_path), name, moe)
        return moe

    def _locate(self, pl_module: pl.LightningModule) -> tuple[str, nn.Module]:
        """The dense model's dotted path in ``pl_module`` and the model itself."""
        from transformers import PreTrainedModel  # lazily: importing weightwise costs no transformers

        if self.attribute is not None:
            parent_path, _, name = self.attribute.rpartition(".")
            return self.attribute, getattr(pl_module.get_submodule(parent_path), name)
        found = []
        for path, module in pl_module.named_modules():
            inside = any(path.startswith(f"{other}.") for other, _ in found)
            if isinstance(module, PreTrainedModel) and not inside:
                found.append((path, module))
        dense = [(p, m) for p, m in found if getattr(m.config, "model_type", None) in TARGETS]
        if len(dense) != 1:
            raise MisconfigurationException(
                f"DenseUpcycling found {len(dense)} dense transformers models ({sorted(TARGETS)}) in {type(pl_module).__name__};"
                " name the one to upcycle with attribute='dotted.path'"
            )
        return dense[0]

    @override
    def restructure(self, pl_module: pl.LightningModule) -> None:
        self._upcycle(pl_module, None)  # the structure; the values are loaded next

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = None if self.done else self._locate(pl_module)  # fail now, not at at_step
        options = f"--from-dense --experts {self.num_experts} --top-k {self.top_k} --method {self.method}"
        options += f" --granularity {self.granularity}" if self.method == "granular" else ""
        options += f" --drop-ratio {self.drop_ratio}" if self.method == "drop" else ""
        require_mid_fit_upcycling(trainer, "DenseUpcycling", model, f"{options} --seed {self.seed}")
        if len(trainer.optimizers) > 1:
            raise MisconfigurationException("DenseUpcycling supports one optimizer")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.done or trainer.global_step < self.at_step:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        before = self._loss(self._locate(pl_module)[1], batch)
        moe = self._upcycle(pl_module, optimizer)
        rewrap_ddp(trainer)  # DDP's reducer was built for the dense parameters
        self.done = True
        self.report = moe.upcycle_report
        self.losses = {"before": before, "after": self._loss(moe, batch)}
        metrics = {f"weightwise/upcycle_loss_{k}": v for k, v in self.losses.items() if v is not None}
        metrics["weightwise/num_experts"] = float(self.num_experts)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @staticmethod
    def _loss(model: nn.Module, batch: Any) -> float | None:
        """The model's loss on ``batch`` (eval mode, no grad), where the batch is a mapping it accepts."""
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
            return None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float(model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss)
        finally:
            model.train(was_training)

    @override
    def state_dict(self) -> dict[str, Any]:
        return with_version({"done": self.done}, self.STATE_VERSION)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_version(state_dict, "DenseUpcycling", self.STATE_VERSION)
        self.done = bool(state_dict["done"])
