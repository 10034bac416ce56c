"""``LayerwiseSampling``: train a few transformer layers at a time (LISA, IST)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from weightwise import distributed
from weightwise.callbacks.strategies import require_single_device_or_ddp, rewrap_ddp
from weightwise.freezing import OptimizerStateStash, StateMode, optimizer_state_bytes
from weightwise.layers import find_layer_stack
from weightwise.zero import ZeroLayerOptimizer, master_partition_bytes, read_client_state

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

    Single device, DDP and DeepSpeed ZeRO-1/2/3. DDP only synchronises parameters that required
    gradients when the model was wrapped, so after every change of the active layers the module is
    wrapped anew (its buckets then hold only the trainable parameters - less communication, too).
    ZeRO keeps master weights and moments of every parameter trainable when its optimizer was built,
    so flipping ``requires_grad`` there saves no memory; under ``DeepSpeedStrategy`` the ZeRO
    optimizer is built anew for each period's layers, with one param group per (group, layer) so
    that the state of layers that stay active is carried exactly (:mod:`weightwise.zero`): the run
    equals DDP's, and the master weights, moments and gradient buffers are those of the active
    layers only. The engine starts with period 0's layers already frozen, and resuming from a
    sharded checkpoint rebuilds the optimizer with the checkpoint's layout before DeepSpeed loads
    it. ZeRO-Offload and ``optimizer_state="offload"`` are refused under DeepSpeed.

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
        self._zero: ZeroLayerOptimizer | None = None
        self._discovered = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            self._check_deepspeed(trainer.strategy)
            self._hook_deepspeed(trainer.strategy, pl_module)
        else:
            require_single_device_or_ddp(trainer, "LayerwiseSampling")

    def _check_deepspeed(self, strategy: DeepSpeedStrategy) -> None:
        zero = (strategy.config or {}).get("zero_optimization") or {}
        offload = (zero.get("offload_optimizer") or {}).get("device", "none")
        problems = [
            (zero.get("stage") not in (1, 2, 3), f"ZeRO stage {zero.get('stage')}: use stage 1, 2 or 3"),
            (offload not in ("none", None), "ZeRO-Offload (offload_optimizer): remove it"),
            ("optimizer" in (strategy.config or {}), "an optimizer in the DeepSpeed config: return it from"
             " configure_optimizers instead"),
            (self.stash.mode != "release", "optimizer_state='offload': use 'release' (ZeRO keeps state per rank partition)"),
        ]
        found = [message for bad, message in problems if bad]
        if found:
            raise MisconfigurationException("LayerwiseSampling under DeepSpeed does not support " + "; ".join(found))

    def _hook_deepspeed(self, strategy: DeepSpeedStrategy, pl_module: pl.LightningModule) -> None:
        """Wrap (on the instances, for this fit) the two moments the ZeRO layout is decided.

        ``configure_optimizers``: DeepSpeed builds its engine from the returned optimizer right away,
        so the optimizer is recorded (it stays what the LR scheduler drives) and the layers outside
        period 0 are frozen first - the engine never holds state for them; ``on_fit_start`` then
        gives the engine the per-layer groups. ``load_checkpoint``:
        DeepSpeed loads the optimizer shards before any callback hook runs, so the ZeRO optimizer is
        rebuilt with the checkpoint's active layers first (read from the checkpoint's client state).
        """
        configure_optimizers, load_checkpoint = pl_module.configure_optimizers, strategy.load_checkpoint

        def layerwise_configure_optimizers() -> Any:
            config = configure_optimizers()
            optimizers = _optimizers_in(config)
            if len(optimizers) != 1:
                raise MisconfigurationException(f"DeepSpeed takes one optimizer; configure_optimizers returned {len(optimizers)}")
            self._discover(pl_module)
            layer_of: dict[torch.nn.Parameter, int | None] = {p: i for i, params in enumerate(self.trainable) for p in params}
            layer_of.update({p: None for p in pl_module.parameters() if p.requires_grad and p not in layer_of})
            self._zero = ZeroLayerOptimizer(optimizers[0], layer_of)
            self._set_trainable(self._draw(0))
            self._zero.hide_untrainable_groups()
            return config

        def layerwise_load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
            # A single file (DeepSpeedStrategy(load_full_weights=True)) restores weights, not optimizer shards.
            if self._zero is not None and Path(checkpoint_path).is_dir():
                state = read_client_state(checkpoint_path).get("callbacks", {}).get(self.state_key)
                if state is None:
                    raise MisconfigurationException(
                        f"{checkpoint_path} was not written by a DeepSpeed run with LayerwiseSampling, so its optimizer"
                        " shards have another layout; resume it without LayerwiseSampling, or start from its weights"
                    )
                self._set_trainable(state["active"])
                self._rebuild_zero(strategy)
            return load_checkpoint(checkpoint_path, *args, **kwargs)

        pl_module.configure_optimizers = layerwise_configure_optimizers  # type: ignore[method-assign]
        strategy.load_checkpoint = layerwise_load_checkpoint  # type: ignore[method-assign]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Drop the per-fit wrappers (instance attributes) so the class methods show through again.
        pl_module.__dict__.pop("configure_optimizers", None)
        trainer.strategy.__dict__.pop("load_checkpoint", None)
        self._zero, self._discovered = None, False

    def _discover(self, pl_module: pl.LightningModule) -> None:
        """Find the layer stack and the parameters to sample (those trainable when fit starts)."""
        if self._discovered:
            return
        _, self.stack = find_layer_stack(pl_module, self.layers_path)
        # Only what the user made trainable is sampled: with PEFT (LoRA) that is each layer's
        # adapters, and the frozen base weights must stay frozen when their layer is chosen.
        self.trainable = [[p for p in layer.parameters() if p.requires_grad] for layer in self.stack]
        if self.n_layers > len(self.stack):
            raise MisconfigurationException(f"n_layers={self.n_layers} but the layer stack has {len(self.stack)} layers")
        if self.importance is None:
            self.importance = torch.zeros(len(self.stack))
        self._discovered = True

    def _set_trainable(self, chosen: list[int]) -> None:
        for i, params in enumerate(self.trainable):
            for p in params:
                p.requires_grad_(i in chosen)
                p.grad = None

    def _rebuild_zero(self, strategy: DeepSpeedStrategy) -> None:
        """A ZeRO optimizer for the parameters that require grad now; Lightning steps the new one."""
        assert self._zero is not None
        if self._zero.rebuild(strategy.deepspeed_engine):
            strategy.optimizers = [strategy.deepspeed_engine.optimizer]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._zero is not None:  # the engine exists now: give it the per-layer groups right away
            self._rebuild_zero(trainer.strategy)  # type: ignore[arg-type]
        self._discover(pl_module)
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
                self._update_importance()  # a collective: every rank has losses of the same period here
            self._period = period
            self._apply(trainer, self._draw(period))
            self.history.append(self.active)
        elif not self._applied:  # resumed mid-period: the fresh module has every layer trainable
            self._apply(trainer, self.active)

    def _apply(self, trainer: pl.Trainer, chosen: list[int]) -> None:
        if self._zero is not None:
            self._set_trainable(chosen)
            self._rebuild_zero(trainer.strategy)  # type: ignore[arg-type]
        else:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self.stash.freeze((p for i, params in enumerate(self.trainable) if i not in chosen for p in params), optimizer)
            self.stash.thaw((p for i in chosen for p in self.trainable[i]), optimizer)
            rewrap_ddp(trainer)  # DDP's reducer covers the parameters that required grad when it was built
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.active, self._applied = chosen, True
        # One value per layer and period: in W&B (or any logger) a layer x step map of what trained.
        metrics = {f"weightwise/layer_active/{i:02d}": float(i in chosen) for i in range(len(self.stack))}
        if self.policy == "ist":
            metrics.update({f"weightwise/layer_importance/{i:02d}": float(v) for i, v in enumerate(self.importance)})
        if optimizer is not None:
            metrics["weightwise/optimizer_state_mib"] = optimizer_state_bytes(optimizer) / 2**20
        if self._zero is not None:
            metrics["weightwise/master_weights_mib"] = master_partition_bytes(optimizer) / 2**20
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._zero is not None:  # the LR scheduler drives the user's optimizer; ZeRO steps the split groups
            self._zero.sync_hyperparameters(optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.policy == "ist" and isinstance(outputs, dict) and "loss" in outputs:
            self._period_losses.append(float(outputs["loss"]))

    def _update_importance(self) -> None:
        # The period's mean loss over every rank's steps: each rank trained on other data, and a
        # reward from its own losses alone would make the ranks draw different layers.
        local = torch.tensor([sum(self._period_losses), float(len(self._period_losses))], dtype=torch.float64)
        total, count = distributed.all_reduce_sum(local).tolist()
        mean = total / count
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
            "optimizer_hyperparameters": None if self._zero is None else self._zero.hyperparameters(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.importance = state_dict["importance"]
        self.history = [list(h) for h in state_dict["history"]]
        self._previous_mean = state_dict["previous_mean"]
        self._period = state_dict["period"]
        self.active = list(state_dict["active"])
        self._period_losses = list(state_dict["period_losses"])
        self._parked_to_load = state_dict.get("parked") or None
        hyperparameters = state_dict.get("optimizer_hyperparameters")
        if self._zero is not None and hyperparameters is not None:
            # DeepSpeed resume (callback state is loaded after the engine is built): the proxy gets lr etc.
            # as the LR scheduler had left them, which DeepSpeed's own optimizer checkpoint does not hold.
            self._zero.load_hyperparameters(hyperparameters)


def _optimizers_in(config: Any) -> list[torch.optim.Optimizer]:
    """The optimizers in any return value of ``configure_optimizers`` (object, list, tuple or dict)."""
    if isinstance(config, torch.optim.Optimizer):
        return [config]
    if isinstance(config, dict):
        return _optimizers_in(config.get("optimizer"))
    if isinstance(config, (list, tuple)):
        return [optimizer for item in config for optimizer in _optimizers_in(item)]
    return []
