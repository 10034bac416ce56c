"""``LayerwiseSampling``: train a few transformer layers at a time (LISA, IST)."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from weightwise.callbacks.strategies import require_rewrappable_strategy, rewrap_ddp
from weightwise.freezing import OptimizerStateStash, StateMode, optimizer_state_bytes
from weightwise.layers import find_layer_stack

Policy = Literal["lisa", "ist"]


class LayerwiseSampling(Callback):
    """Every ``interval`` steps, choose ``n_layers`` layers of the stack to train; freeze the others.

    * ``"lisa"`` - LISA (Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large
      Language Model Fine-Tuning", 2024): the active layers are drawn uniformly; everything outside
      the layer stack (embeddings, head, final norm) always trains.
    * ``"ist"`` - importance-aware sampling in the spirit of IST ("Importance-aware Sparse Tuning",
      2024): each layer has an importance score; a period's reward is the decrease of the mean
      training loss from the previous period, ``s_l <- (1 - beta) s_l + beta * reward`` for the layers
      that were active, and layers are drawn without replacement with probability
      ``softmax(s / temperature)``.

    Only parameters that were trainable when ``fit`` started are sampled, so with PEFT adapters
    (e.g. ``peft`` LoRA) the chosen layers' adapters train and base weights stay frozen.

    Frozen layers get ``requires_grad=False`` and ``grad=None`` (so AdamW's momentum and weight
    decay leave them bit-identical) and their optimizer state is released or offloaded to CPU
    (:mod:`weightwise.freezing`); parked state is saved in checkpoints. The choice of each period is
    seeded by ``(seed, period)``, so it is identical on every rank and after resuming. Logged at
    every period: ``weightwise/layer_active/NN`` (1 for the layers that train, 0 otherwise - a
    layer x step map), ``weightwise/layer_importance/NN`` (IST) and ``weightwise/optimizer_state_mib``.

    Single device and DDP. DDP only synchronises parameters that required gradients when the model
    was wrapped, so after every change of the active layers the module is wrapped anew (its buckets
    then hold only the trainable parameters - less communication, too). DeepSpeed is refused: ZeRO
    keeps master weights and moments of every parameter trainable when its engine started, so
    flipping ``requires_grad`` there saves no optimizer memory (measured; see benchmarks/RESULTS.md
    for the rebuild-per-period design it needs).

    Args:
        policy: ``"lisa"`` or ``"ist"``.
        n_layers: gamma, layers trained per period (LISA's default 2).
        interval: K, steps per period (LISA samples every K = 20-50 steps).
        layers: dotted path of the layer ``ModuleList`` (default: found, see :func:`find_layer_stack`).
        optimizer_state: ``"release"`` or ``"offload"`` for frozen layers' optimizer state.
        seed: base seed of the layer draws.
        beta, temperature: IST's score smoothing and sampling temperature.
    """

    def __init__(
        self,
        policy: Policy = "lisa",
        n_layers: int = 2,
        interval: int = 20,
        *,
        layers: str | None = None,
        optimizer_state: StateMode = "release",
        seed: int = 0,
        beta: float = 0.5,
        temperature: float = 1.0,
    ) -> None:
        if policy not in ("lisa", "ist"):
            raise ValueError(f"policy must be 'lisa' or 'ist', got {policy!r}")
        if n_layers < 1 or interval < 1:
            raise ValueError(f"n_layers and interval must be >= 1, got {n_layers}, {interval}")
        self.policy = policy
        self.n_layers = n_layers
        self.interval = interval
        self.layers_path = layers
        self.stash = OptimizerStateStash(optimizer_state)
        self.seed = seed
        self.beta = beta
        self.temperature = temperature
        self.active: list[int] = []
        self.importance: Tensor | None = None
        self.history: list[list[int]] = []
        self._period_losses: list[float] = []
        self._previous_mean: float | None = None
        self._period: int | None = None
        self._applied = False
        self._param_names: dict[torch.nn.Parameter, str] = {}
        self._parked_to_load: dict[str, dict[str, Any]] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_rewrappable_strategy(
            trainer,
            "LayerwiseSampling",
            "Use strategy='ddp' (with LayerwiseSampling the optimizer state is already that of the active"
            " layers only), or freeze a fixed set of layers before fit for DeepSpeed.",
        )
        _, self.stack = find_layer_stack(pl_module, self.layers_path)
        # Only what the user made trainable is sampled: with PEFT (LoRA) that is each layer's
        # adapters, and the frozen base weights must stay frozen when their layer is chosen.
        self.trainable = [[p for p in layer.parameters() if p.requires_grad] for layer in self.stack]
        if self.n_layers > len(self.stack):
            raise MisconfigurationException(f"n_layers={self.n_layers} but the layer stack has {len(self.stack)} layers")
        if self.importance is None:
            self.importance = torch.zeros(len(self.stack))
        self._param_names = {p: name for name, p in pl_module.named_parameters()}
        if self._parked_to_load is not None:  # resumed "offload" run: the parked moments come back too
            self.stash.load_state_dict(self._parked_to_load, dict(pl_module.named_parameters()))
            self._parked_to_load = None

    def _draw(self, period: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + period)
        if self.policy == "lisa":
            chosen = torch.randperm(len(self.stack), generator=generator)[: self.n_layers]
        else:
            probs = torch.softmax(self.importance / self.temperature, dim=0)
            chosen = torch.multinomial(probs, self.n_layers, replacement=False, generator=generator)
        return sorted(chosen.tolist())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        period = trainer.global_step // self.interval
        if period != self._period:
            if self.policy == "ist" and self._period_losses and self.active:
                self._update_importance()
            self._period = period
            self._apply(trainer, self._draw(period))
            self.history.append(self.active)
        elif not self._applied:  # resumed mid-period: the fresh module has every layer trainable
            self._apply(trainer, self.active)

    def _apply(self, trainer: pl.Trainer, chosen: list[int]) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.stash.freeze((p for i, params in enumerate(self.trainable) if i not in chosen for p in params), optimizer)
        self.stash.thaw((p for i in chosen for p in self.trainable[i]), optimizer)
        rewrap_ddp(trainer)  # DDP's reducer covers the parameters that required grad when it was built
        self.active, self._applied = chosen, True
        # One value per layer and period: in W&B (or any logger) a layer x step map of what trained.
        metrics = {f"weightwise/layer_active/{i:02d}": float(i in chosen) for i in range(len(self.stack))}
        if self.policy == "ist":
            metrics.update({f"weightwise/layer_importance/{i:02d}": float(v) for i, v in enumerate(self.importance)})
        if optimizer is not None:
            metrics["weightwise/optimizer_state_mib"] = optimizer_state_bytes(optimizer) / 2**20
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.policy == "ist" and isinstance(outputs, dict) and "loss" in outputs:
            self._period_losses.append(float(outputs["loss"]))

    def _update_importance(self) -> None:
        mean = sum(self._period_losses) / len(self._period_losses)
        if self._previous_mean is not None:
            reward = self._previous_mean - mean
            for i in self.active:
                self.importance[i] = (1 - self.beta) * self.importance[i] + self.beta * reward
        self._previous_mean = mean
        self._period_losses = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "importance": None if self.importance is None else self.importance.clone(),
            "history": [list(h) for h in self.history],
            "previous_mean": self._previous_mean,
            "period": self._period,
            "active": list(self.active),
            "period_losses": list(self._period_losses),
            "parked": self.stash.state_dict(self._param_names),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.importance = state_dict["importance"]
        self.history = [list(h) for h in state_dict["history"]]
        self._previous_mean = state_dict["previous_mean"]
        self._period = state_dict["period"]
        self.active = list(state_dict["active"])
        self._period_losses = list(state_dict["period_losses"])
        self._parked_to_load = state_dict.get("parked") or None
