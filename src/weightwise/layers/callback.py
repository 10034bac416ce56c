"""``LayerwiseSampling``: train a few transformer layers at a time (LISA, IST, BAdam's cycles, block influence)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from weightwise.core import collectives
from weightwise.core.checkpoints import state_version, with_version
from weightwise.integrations.lightning import (
    MethodPatch,
    check_trainer,
    fsdp_keeps_original_parameters,
    is_deepspeed,
    is_fsdp,
    is_model_parallel,
    layers_sharing_an_fsdp_unit,
    model_parallel_checkpoint_meta,
    parameters_for_direct_forward,
    require_single_device_or_ddp,
    rewrap_ddp,
)
from weightwise.integrations.torch import check_fsdp2, refresh_fsdp2_dtypes
from weightwise.layers.freezing import HostMasters, OptimizerStateStash, StateMode, activate_layers, optimizer_state_bytes
from weightwise.layers.influence import influence_totals
from weightwise.layers.policies import (
    BlockInfluenceLayers,
    ISTLayers,
    LayerPolicy,
    LossCreditLayers,
    Order,
    OrderedBlocks,
    UniformLayers,
)
from weightwise.layers.probes import PROBE_BATCH_SIZE, ProbeBatches, ProbeLoss, default_probe_loss, probe
from weightwise.layers.stack import find_layer_stack

Policy = Literal["lisa", "ist", "badam", "loss_credit", "block_influence"]


@dataclass(frozen=True)
class PolicyDefaults:
    """What each policy's reference runs with, where the callback's argument is left at ``None``."""

    policy: type[LayerPolicy]
    n_layers: int | None  # None: a quarter of the stack (IST's budget)
    interval: int
    train_outside_stack: bool
    optimizer_state: StateMode


POLICIES: dict[str, PolicyDefaults] = {
    # LISA (LMFlow): 2 layers every 20 steps, embeddings/head/norm always train. LMFlow keeps frozen
    # layers' Adam state; weightwise releases it - the memory LISA's claim rests on.
    "lisa": PolicyDefaults(UniformLayers, 2, 20, True, "release"),
    # IST: 25% of the layers, re-drawn every step; the reference (HF Trainer) keeps optimizer state.
    "ist": PolicyDefaults(ISTLayers, None, 1, True, "keep"),
    # BAdam: one block, switch_block_every=50, embeddings and head off, state cleared at each switch.
    "badam": PolicyDefaults(OrderedBlocks, 1, 50, False, "release"),
    "loss_credit": PolicyDefaults(LossCreditLayers, 2, 20, True, "release"),
    # ShortGPT measures block influence and removes layers; sampling by it is weightwise's: LISA's
    # budget (2 layers every 20 steps, embeddings/head/norm train) with the draw weighted by BI.
    "block_influence": PolicyDefaults(BlockInfluenceLayers, 2, 20, True, "release"),
}


def _unsupported_under_deepspeed(problems: list[str]) -> MisconfigurationException:
    """The refusal of DeepSpeed settings the per-period ZeRO rebuild does not support, each with its fix."""
    return MisconfigurationException("LayerwiseSampling under DeepSpeed does not support " + "; ".join(problems))


class LayerwiseSampling(Callback):
    """Every ``interval`` steps, choose ``n_layers`` layers of the stack to train; freeze the others.

    Policies (:mod:`weightwise.layers.policies`; defaults are the reference's, see :data:`POLICIES`):

    * ``"lisa"`` - LISA (Pan et al., 2024; LMFlow's ``DynamicLayerActivationCallback``): 2 layers drawn
      uniformly every 20 steps; everything outside the layer stack (embeddings, head, final norm)
      always trains.
    * ``"ist"`` - IST (Yao et al., EMNLP 2024 Findings; ``antgroup/importance-aware-sparse-tuning-IST-paper``):
      a quarter of the layers re-drawn every step by a score learned from suppression probes - every
      10 steps, 3 forward passes each with a random half of the layers responding at 25%, scored by
      ``exp(-loss)`` against their mean (REINFORCE); probe losses are averaged over every rank. As the
      reference, the probes evaluate their own batch of ``probe_batch_size=16`` samples drawn from
      shuffled passes over the training loader's dataset (seeded: the same batch on every rank), not
      the training micro-batch, so the reward's noise does not depend on the micro-batch size.
    * ``"badam"`` - BAdam's block cycles (``Ledzy/BAdam``): one layer at a time in descending,
      ascending or random order (``order``), every layer once per cycle, switching every 50 steps,
      embeddings and head frozen.
    * ``"loss_credit"`` - the policy weightwise 0.1 called ``"ist"``: a period's loss decrease is
      credited to its active layers.
    * ``"block_influence"`` - ShortGPT's block influence (Men et al., 2024; ``icip-cas/ShortGPT``,
      ``shortgpt/metrics.py``), ``BI = 1 - E[cos(layer input, layer output)]``: 2 layers every 20 steps
      (LISA's budget) drawn with probability proportional to ``BI ** (1 / temperature)``
      (:class:`~weightwise.layers.policies.BlockInfluenceLayers`). BI is measured on the step's batch,
      or on ``influence_data`` (a few fixed batches, as ShortGPT measures on a calibration set)
      (eval mode, no gradients, padding masked by the batch's ``attention_mask``) before period 0
      and before every ``refresh_every``-th period; the sums are added over every rank before the
      mean is taken, so all ranks draw the same layers. A measurement costs one forward pass.

    Options beside the policy: ``train_outside_stack=False`` freezes embeddings, head and final
    norm for the whole run (at 8B they are most of what LISA trains); ``always_active`` pins layers
    that train in every period on top of the drawn ones. Only parameters that were trainable when
    ``fit`` started are sampled, so with PEFT adapters (e.g. ``peft`` LoRA) the chosen layers'
    adapters train and base weights stay frozen.

    Frozen layers get ``requires_grad=False`` and ``grad=None`` (so AdamW's momentum and weight
    decay leave them bit-identical) and their optimizer state is released, offloaded to CPU or kept
    (:mod:`weightwise.layers.freezing`); parked state is saved in checkpoints. When fit ends - or
    raises, or is interrupted - every parameter's ``requires_grad`` and dtype are what they were when
    it started, so a next fit (plain or sampled) trains what the user made trainable. Every choice is a
    function of the seed, the period and statistics reduced over every rank, so it is identical on
    every rank and after resuming. Logged at every period: ``weightwise/layer_active/NN`` (1 for the
    layers that train, 0 otherwise), ``weightwise/layer_importance/NN`` (policies with scores) and
    ``weightwise/optimizer_state_mib``; at the end of the fit (also one that raised), with a
    ``WandbLogger``, the whole layer x period map as one table, ``weightwise/layer_map``.

    Single device, DDP, DeepSpeed ZeRO-1/2/3, ``ModelParallelStrategy`` (FSDP2) and ``FSDPStrategy``
    (FSDP1, ``use_orig_params=True``, each layer its own unit). DDP only synchronises parameters that required
    gradients when the model was wrapped, so after every change of the active layers the module is
    wrapped anew (its buckets then hold only the trainable parameters - less communication, too).
    ZeRO keeps master weights and moments of every parameter trainable when its optimizer was built,
    so flipping ``requires_grad`` there saves no memory; under ``DeepSpeedStrategy`` the ZeRO
    optimizer is built anew for each period's layers, with one param group per (group, layer) so
    that the state of layers that stay active is carried exactly
    (:mod:`weightwise.integrations.deepspeed`): the run equals DDP's, and the master weights, moments
    and gradient buffers are those of the active layers only. The engine starts with period 0's
    layers already frozen, and resuming from a sharded checkpoint rebuilds the optimizer with the
    checkpoint's layout before DeepSpeed loads it. ZeRO-Offload, fp16 and optimizer states other
    than ``"release"`` are refused under DeepSpeed. Under FSDP2 (``fully_shard`` in ``configure_model``:
    each parameter a DTensor shard) a frozen layer is all-gathered for the forward but gets no
    gradient, no reduce-scatter and no optimizer state on any rank; resuming from the sharded
    (``torch.distributed.checkpoint``) checkpoint first gives the optimizer the checkpoint's layout.
    FSDP1 allocates no gradient for a unit whose parameters are all frozen but keeps the whole flat
    gradient of a unit with any trainable parameter (measured, ``benchmarks/RESULTS.md``), so each
    layer of the stack must be its own unit (``auto_wrap_policy={DecoderLayerClass}``); IST's probes
    and block influence's measurements gather the whole model on every rank under FSDP1
    (``summon_full_params``). ``frozen_dtype`` and ``optimizer_state="offload"`` are refused under
    both, naming FSDP's own mixed precision and CPU offload.

    Args:
        policy: ``"lisa"``, ``"ist"``, ``"badam"``, ``"loss_credit"`` or ``"block_influence"``.
        n_layers: layers drawn per period (``None``: the policy's default - LISA 2, IST a quarter, BAdam 1,
            loss credit 2, block influence 2).
        interval: steps per period (``None``: LISA 20, IST 1, BAdam 50, loss credit 20, block influence 20).
        layers: dotted path of the layer ``ModuleList`` (default: found, see :func:`find_layer_stack`).
        train_outside_stack: whether parameters outside the stack train (``None``: False for BAdam).
        always_active: layer indices that train in every period.
        optimizer_state: ``"release"``, ``"offload"`` or ``"keep"`` for frozen layers' optimizer state
            (``None``: ``"keep"`` for IST, ``"release"`` otherwise).
        seed: base seed of the draws.
        order: BAdam's block order.
        beta, temperature: ``"loss_credit"``'s score smoothing and sampling temperature (``temperature``
            is also ``"block_influence"``'s).
        refresh_every: ``"block_influence"``: periods between measurements of block influence (5).
        influence_data: ``"block_influence"``: batches to measure on (e.g. a list of a few held-out
            batches, or a small DataLoader), moved to the module's device; default: each rank's
            training batch of the step. Iterated at every measurement.
        probe_every, probes, suppression, ist_learning_rate: IST's 10, 3, 0.25 and 10.
        frozen_dtype: store frozen layers in this type (``torch.bfloat16``) with their fp32 weights parked
            in host memory until they train again (:class:`weightwise.layers.freezing.HostMasters`): on
            the accelerator, fp32 weights exist for the active layers only. Needs
            ``Trainer(precision="bf16-mixed")``; not under DeepSpeed (ZeRO keeps its own masters).
        probe_loss: ``(module, batch) -> scalar`` for IST's probes, and the forward pass of block
            influence's measurements (default :func:`~weightwise.layers.probes.default_probe_loss`: the
            loss of the transformers model inside the module on the batch's ``input_ids``/``labels``,
            as the reference, else the module's own ``training_step`` loss with logging silenced).
        probe_batch_size: IST's probe batch: this many samples (the reference's 16) drawn from the
            training loader's dataset (:class:`~weightwise.layers.probes.ProbeBatches`); ``None``: each
            probing step's own micro-batch (weightwise 0.2's; the only choice for a stream).

    Raises:
        ValueError: an unknown policy or a non-positive setting.
        MisconfigurationException: (at IST's first probe) a training set that cannot be indexed for the
            probes' own batches (names ``probe_batch_size=None``); (at setup) settings a strategy does not
            support - DeepSpeed's, FSDP's (``use_orig_params=False``, ``frozen_dtype``,
            ``optimizer_state="offload"``), any strategy but single device, DDP, DeepSpeed and FSDP; (at fit
            start, FSDP1) layers that share an FSDP unit with other parameters - each naming the fix.

    Example::

        >>> import lightning.pytorch as pl
        >>> from weightwise.callbacks import LayerwiseSampling
        >>> trainer = pl.Trainer(callbacks=[LayerwiseSampling("lisa", n_layers=2, interval=20)], logger=False)
    """

    STATE_VERSION = 1

    def __init__(
        self,
        policy: Policy = "lisa",
        n_layers: int | None = None,
        interval: int | None = None,
        *,
        layers: str | None = None,
        train_outside_stack: bool | None = None,
        always_active: Sequence[int] = (),
        optimizer_state: StateMode | None = None,
        seed: int = 0,
        order: Order = "descending",
        beta: float = 0.5,
        temperature: float = 1.0,
        refresh_every: int = 5,
        influence_data: Iterable[Any] | None = None,
        probe_every: int = 10,
        probes: int = 3,
        suppression: float = 0.25,
        ist_learning_rate: float = 10.0,
        probe_loss: ProbeLoss | None = None,
        probe_batch_size: int | None = PROBE_BATCH_SIZE,
        frozen_dtype: torch.dtype | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
        defaults = POLICIES[policy]
        self.policy = policy
        self.n_layers = n_layers
        self.interval = defaults.interval if interval is None else interval
        if (n_layers is not None and n_layers < 1) or self.interval < 1:
            raise ValueError(f"n_layers and interval must be >= 1, got {n_layers}, {self.interval}")
        if not 0.0 <= suppression < 1.0:
            raise ValueError(f"suppression must be in [0, 1), got {suppression}")
        self.layers_path = layers
        self.train_outside_stack = defaults.train_outside_stack if train_outside_stack is None else train_outside_stack
        self.always_active = sorted(set(always_active))
        self.stash = OptimizerStateStash(defaults.optimizer_state if optimizer_state is None else optimizer_state)
        self.masters = None if frozen_dtype is None else HostMasters(frozen_dtype)
        if self.masters is not None and self.stash.mode == "keep":
            raise ValueError("frozen_dtype changes a frozen parameter's dtype, so its optimizer state cannot be kept: use optimizer_state='release'")
        if influence_data is not None and policy != "block_influence":
            raise ValueError(f"influence_data is for policy='block_influence', not {policy!r}")
        self.influence_data = influence_data
        self.seed = seed
        self.policy_options: dict[str, Any] = {
            "badam": {"order": order},
            "loss_credit": {"beta": beta, "temperature": temperature},
            "ist": {"probe_every": probe_every, "probes": probes, "learning_rate": ist_learning_rate},
            "block_influence": {"temperature": temperature, "refresh_every": refresh_every},
        }.get(policy, {})
        self.suppression = suppression
        self.probe_loss: ProbeLoss = probe_loss or default_probe_loss
        self.probe_batches = ProbeBatches(probe_batch_size, seed=seed)
        if policy == "loss_credit":  # validate now, not when fit starts
            LossCreditLayers(2, 1, beta=beta, temperature=temperature)
        if policy == "ist":
            ISTLayers(4, 1, probe_every=probe_every, probes=probes, learning_rate=ist_learning_rate)
        if policy == "badam":
            OrderedBlocks(2, 1, order=order)
        if policy == "block_influence":
            BlockInfluenceLayers(2, 1, temperature=temperature, refresh_every=refresh_every)
        self.chooser: LayerPolicy | None = None
        self.active: list[int] = []
        self.history: list[list[int]] = []
        self._period_loss = torch.zeros(2, dtype=torch.float64)  # this rank's (sum, count) in the current period
        self._period: int | None = None
        self._applied = False
        self._outside: list[torch.nn.Parameter] = []
        self._param_names: dict[torch.nn.Parameter, str] = {}
        self._parked_to_load: dict[str, dict[str, Any]] | None = None
        self._masters_to_load: dict[str, Tensor] | None = None
        self._chooser_state: dict[str, Any] | None = None
        self._zero: Any = None  # a weightwise.integrations.deepspeed.ZeroLayerOptimizer under DeepSpeed
        self._patches: list[MethodPatch] = []
        self._discovered = False
        self._user_requires_grad: dict[torch.nn.Parameter, bool] = {}
        self._probed: int | None = None  # the step whose probes ran (a resumed step does not probe twice)
        # Under ModelParallelStrategy: the optimizer whose per-parameter state a checkpoint lists (a weak
        # reference: a checkpoint saved after fit still lists it, and the callback keeps nothing alive).
        self._sharded_optimizer: Callable[[], torch.optim.Optimizer | None] = lambda: None

    @property
    def importance(self) -> Tensor | None:
        """The policy's per-layer scores (``None`` before fit or for LISA)."""
        return None if self.chooser is None else self.chooser.importance

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_trainer(trainer)
        # A fit of its own: the last fit's period and the moments parked from its optimizer do not carry
        # over (a resumed fit loads its own right after setup, in load_state_dict).
        self._period, self._applied = None, False
        self._period_loss.zero_()
        self.stash.parked = {}
        if self.masters is not None:
            needed = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}.get(self.masters.dtype)
            if str(trainer.precision) != needed:
                raise MisconfigurationException(
                    f"frozen_dtype={self.masters.dtype} stores frozen layers in low precision, which their forward only"
                    f" accepts under autocast to that type: use Trainer(precision={needed or 'bf16-mixed'!r}) with it"
                    f" (now precision={trainer.precision!r}, frozen_dtype={self.masters.dtype})"
                )
        if is_deepspeed(trainer):
            self._hook_deepspeed(trainer.strategy, pl_module, str(trainer.precision))
        elif is_model_parallel(trainer) or is_fsdp(trainer):
            self._check_sharded(trainer)
            if is_model_parallel(trainer):
                self._hook_model_parallel(trainer.strategy, pl_module)
        else:
            require_single_device_or_ddp(trainer, "LayerwiseSampling")

    def _hook_deepspeed(self, strategy: Any, pl_module: pl.LightningModule, precision: str) -> None:
        """Wrap (on the instances, for this fit) the two moments the ZeRO layout is decided.

        ``configure_optimizers``: DeepSpeed builds its engine from the returned optimizer right away,
        so the optimizer is recorded (it stays what the LR scheduler drives) and the layers outside
        period 0 are frozen first - the engine never holds state for them; ``on_fit_start`` then
        gives the engine the per-layer groups. ``load_checkpoint``: DeepSpeed loads the optimizer
        shards before any callback hook runs, so the ZeRO optimizer is rebuilt with the checkpoint's
        active layers first (read from the checkpoint's client state).
        """
        from weightwise.integrations import deepspeed

        deepspeed.check_version()
        problems = deepspeed.unsupported_settings(strategy.config or {}, precision)
        if self.masters is not None:
            problems.append("frozen_dtype (ZeRO keeps the fp32 masters of the trainable parameters itself): remove it")
        if self.stash.mode != "release":
            problems.append(
                f"optimizer_state={self.stash.mode!r}: use 'release' (ZeRO rebuilds its optimizer for each period's layers,"
                " and keeps state per rank partition)"
            )
        if problems:
            raise _unsupported_under_deepspeed(problems)

        def make_configure_optimizers(configure_optimizers: Any) -> Any:
            def layerwise_configure_optimizers() -> Any:
                config = configure_optimizers()
                optimizers = _optimizers_in(config)
                if len(optimizers) != 1:
                    raise MisconfigurationException(f"DeepSpeed takes one optimizer; configure_optimizers returned {len(optimizers)}")
                self._discover(pl_module)
                for p in self._outside if not self.train_outside_stack else ():
                    p.requires_grad_(False)  # never in the engine
                layer_of: dict[torch.nn.Parameter, int | None] = {p: i for i, params in enumerate(self.trainable) for p in params}
                layer_of.update({p: None for p in pl_module.parameters() if p.requires_grad and p not in layer_of})
                self._zero = deepspeed.ZeroLayerOptimizer(optimizers[0], layer_of)
                self._set_trainable(self.chooser.choose(0))
                self._zero.hide_untrainable_groups()
                return config

            return layerwise_configure_optimizers

        def make_load_checkpoint(load_checkpoint: Any) -> Any:
            def layerwise_load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
                # A single file (DeepSpeedStrategy(load_full_weights=True)) restores weights, not optimizer shards.
                if self._zero is not None and Path(checkpoint_path).is_dir():
                    state = deepspeed.read_client_state(checkpoint_path).get("callbacks", {}).get(self.state_key)
                    if state is None:
                        raise MisconfigurationException(
                            f"{checkpoint_path} was not written by a DeepSpeed run with LayerwiseSampling, so its optimizer"
                            " shards have another layout; resume it without LayerwiseSampling, or start from its weights"
                        )
                    self._set_trainable(state["active"])
                    self._rebuild_zero(strategy)
                return load_checkpoint(checkpoint_path, *args, **kwargs)

            return layerwise_load_checkpoint

        self._patches = [
            MethodPatch(pl_module, "configure_optimizers", make_configure_optimizers),
            MethodPatch(strategy, "load_checkpoint", make_load_checkpoint),
        ]

    def _check_sharded(self, trainer: pl.Trainer) -> None:
        """``ModelParallelStrategy`` (FSDP2) and ``FSDPStrategy(use_orig_params=True)`` (FSDP1) shard each
        parameter (FSDP1: each unit's flat parameter) over the ranks; freezing works as on one device,
        ``requires_grad=False`` and ``grad=None``, with the optimizer state of the sharded parameters
        released (or kept). FSDP2 computes and reduce-scatters no gradient for a frozen parameter; FSDP1
        allocates none for a unit whose original parameters are all frozen - but keeps the whole flat
        gradient of a unit with any trainable parameter, so each layer must be a unit of its own
        (checked in ``on_fit_start``, once FSDP has wrapped the model: :meth:`_require_layer_units`).

        Raises:
            MisconfigurationException: FSDP1 without ``use_orig_params=True``, ``frozen_dtype`` or
                ``optimizer_state="offload"``, each with its fix.
        """
        label = "ModelParallelStrategy (FSDP2)" if is_model_parallel(trainer) else "FSDPStrategy (FSDP1)"
        problems = []
        if is_fsdp(trainer) and not fsdp_keeps_original_parameters(trainer):
            problems.append(
                "use_orig_params=False (FSDP1 then registers only the flat parameters, whose requires_grad is fixed when it"
                " wraps them): pass FSDPStrategy(use_orig_params=True, auto_wrap_policy={YourDecoderLayer}), or use"
                " ModelParallelStrategy (FSDP2: fully_shard each decoder layer, then the root, in configure_model)"
            )
        if self.masters is not None:
            problems.append(
                "frozen_dtype (FSDP fixes each shard's dtype when it wraps the model; changing it breaks its all-gather):"
                " remove it; for bf16 weights in the forward pass use FSDP's mixed precision (FSDP2:"
                " fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)))"
            )
        if self.stash.mode == "offload":
            problems.append(
                "optimizer_state='offload' (the parked moments are each rank's own shards, and Lightning saves callback state"
                " from rank 0 only): use 'release' or 'keep', or FSDP's CPU offload (FSDP2:"
                " fully_shard(..., offload_policy=CPUOffloadPolicy())) to keep parameters, gradients and optimizer state in"
                " host memory"
            )
        if problems:
            raise MisconfigurationException(f"LayerwiseSampling under {label} does not support " + "; ".join(problems))

    def _require_layer_units(self, trainer: pl.Trainer) -> None:
        """Under FSDP1, each layer of the stack must be an FSDP unit of its own (see :meth:`_check_sharded`).

        Raises:
            MisconfigurationException: a layer wrapped together with other parameters, naming the fix.
        """
        shared = layers_sharing_an_fsdp_unit(self.stack)
        if shared:
            layer_class = type(self.stack[shared[0]]).__name__
            raise MisconfigurationException(
                f"LayerwiseSampling under FSDPStrategy needs each layer of the stack to be an FSDP unit of its own, but"
                f" layers {shared[:5]} share a flat parameter with other parameters: FSDP1 keeps that flat parameter's whole"
                " gradient while any of its parameters trains, so freezing a layer would release no gradient memory"
                " (measured, benchmarks/RESULTS.md). Pass FSDPStrategy(use_orig_params=True,"
                f" auto_wrap_policy={{{layer_class}}}), or use ModelParallelStrategy (FSDP2)."
            )

    def _hook_model_parallel(self, strategy: Any, pl_module: pl.LightningModule) -> None:
        """The resume under ``ModelParallelStrategy`` (FSDP2): Lightning loads the optimizer through
        ``torch.distributed.checkpoint`` right after the strategy's setup, with a template that gives
        state to every parameter requiring grad, and fails on state the checkpoint lacks (the frozen
        layers'). So ``load_checkpoint`` first makes exactly the parameters that held state when the
        checkpoint was written require grad; the first batch then applies the checkpoint's layers.
        (FSDP1's sharded optimizer load reads only the states the checkpoint holds.)
        """

        def make_load_checkpoint(load_checkpoint: Any) -> Any:
            def layerwise_load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
                self._discover(pl_module)  # the DTensor parameters, and the user's requires_grad before it changes
                state = model_parallel_checkpoint_meta(checkpoint_path).get("callbacks", {}).get(self.state_key) or {}
                with_state = state.get("optimizer_state_params")
                if with_state is not None:  # else written without LayerwiseSampling: every parameter has state
                    with_state = set(with_state)
                    for name, p in pl_module.named_parameters():
                        if self._user_requires_grad.get(p):
                            p.requires_grad_(name in with_state)
                return load_checkpoint(checkpoint_path, *args, **kwargs)

            return layerwise_load_checkpoint

        self._patches = [MethodPatch(strategy, "load_checkpoint", make_load_checkpoint)]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._log_layer_map(trainer)
            self._leave(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._log_layer_map(trainer)
        # Lightning calls no teardown hook when fit raises (or is interrupted): the module is given back here.
        self._leave(pl_module)

    def _log_layer_map(self, trainer: pl.Trainer) -> None:
        """The run's layer x period map as one W&B table, ``weightwise/layer_map``: a row per period
        (its first step), a column per layer, 1 where the layer trained. Other loggers have the
        per-period scalars ``weightwise/layer_active/NN`` only."""
        if not self.history or not self._discovered or not trainer.is_global_zero:  # _discovered: self.stack exists
            return
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not wandb_loggers:
            return
        import wandb

        columns = ["step", *(f"layer_{i:02d}" for i in range(len(self.stack)))]
        rows = [[period * self.interval, *(int(i in active) for i in range(len(self.stack)))] for period, active in enumerate(self.history)]
        for logger in wandb_loggers:
            logger.experiment.log({"weightwise/layer_map": wandb.Table(columns=columns, data=rows)})

    def _leave(self, pl_module: pl.LightningModule) -> None:
        """Give the module back as the user gave it (docs/architecture.md, contract 6): fp32 weights,
        each parameter's ``requires_grad`` as it was when fit started, the class methods. The
        schedule's state stays (a checkpoint saved after the fit still holds it). Safe to call more
        than once."""
        if self.masters is not None:  # the exact fp32 weights, not their low-precision copies
            self.masters.thaw(list(self.masters.masters))
        for p, requires_grad in self._user_requires_grad.items():
            p.requires_grad_(requires_grad)
        self._user_requires_grad = {}
        refresh_fsdp2_dtypes(pl_module)  # FSDP2's gradient dtypes for what trains now (integrations/torch.py)
        for patch in self._patches:  # the class methods show through again
            patch.restore()
        self._patches = []
        self._zero, self._discovered = None, False

    def _discover(self, pl_module: pl.LightningModule) -> None:
        """Find the layer stack and the parameters to sample (those trainable when fit starts)."""
        if self._discovered:
            return
        _, self.stack = find_layer_stack(pl_module, self.layers_path)
        self._user_requires_grad = {p: p.requires_grad for p in pl_module.parameters()}  # given back by _leave
        # Only what the user made trainable is sampled: with PEFT (LoRA) that is each layer's
        # adapters, and the frozen base weights must stay frozen when their layer is chosen.
        self.trainable = [[p for p in layer.parameters() if p.requires_grad] for layer in self.stack]
        in_stack = {p for params in self.trainable for p in params}
        self._outside = [p for p in pl_module.parameters() if p.requires_grad and p not in in_stack]
        if self.chooser is None:
            self.chooser = self._make_policy(len(self.stack))
            if self._chooser_state is not None:
                self.chooser.load_state_dict(self._chooser_state)
                self._chooser_state = None
        self._discovered = True

    def _make_policy(self, num_layers: int) -> LayerPolicy:
        defaults = POLICIES[self.policy]
        n_layers = self.n_layers if self.n_layers is not None else defaults.n_layers or max(1, num_layers // 4)
        try:
            return defaults.policy(num_layers, n_layers, self.seed, self.always_active, **self.policy_options)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error

    def _set_trainable(self, chosen: list[int]) -> None:
        for i, params in enumerate(self.trainable):
            for p in params:
                p.requires_grad_(i in chosen)
                p.grad = None

    def _rebuild_zero(self, strategy: Any) -> None:
        """A ZeRO optimizer for the parameters that require grad now; Lightning steps the new one."""
        assert self._zero is not None
        strategy.optimizers = []  # Lightning's reference to the old ZeRO optimizer: gone before the new one is built
        self._zero.rebuild(strategy.deepspeed_engine)
        strategy.optimizers = [strategy.deepspeed_engine.optimizer]  # the new one, or the old when nothing changed

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._zero is not None:  # the engine exists now: give it the per-layer groups right away
            from weightwise.integrations import deepspeed

            # The config is complete now (Lightning adds its precision sections after the callbacks' setup).
            problems = deepspeed.unsupported_settings(trainer.strategy.config or {}, str(trainer.precision))  # type: ignore[attr-defined]
            if problems:
                raise _unsupported_under_deepspeed(problems)
            try:
                deepspeed.check_engine(trainer.strategy.deepspeed_engine)  # type: ignore[attr-defined]
            except ValueError as error:
                raise MisconfigurationException(str(error)) from error
            self._rebuild_zero(trainer.strategy)
        self._discover(pl_module)
        if is_fsdp(trainer):
            self._require_layer_units(trainer)
        if is_model_parallel(trainer):
            check_fsdp2(pl_module)
        if self._masters_to_load is not None and self.masters is not None:  # resumed: the exact fp32 weights come back
            self.masters.load_state_dict(self._masters_to_load, dict(pl_module.named_parameters()))
            self._masters_to_load = None
        if not self.train_outside_stack and self._zero is None:  # embeddings, head, norms: frozen for the run
            self.stash.freeze(self._outside, trainer.optimizers[0] if trainer.optimizers else None)
            if self.masters is not None:
                self.masters.freeze(self._outside)
        self._param_names = {p: name for name, p in pl_module.named_parameters()}
        self._sharded_optimizer = weakref.ref(trainer.optimizers[0]) if is_model_parallel(trainer) and trainer.optimizers else (lambda: None)
        if self._parked_to_load is not None:  # resumed "offload" run: the parked moments come back too
            self.stash.load_state_dict(self._parked_to_load, dict(pl_module.named_parameters()))
            self._parked_to_load = None

    # ------------------------------------------------------------------ the periods
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.chooser is not None
        step = trainer.global_step
        if self.chooser.wants_probes(step) and self._probed != step:
            self._probe(trainer, pl_module, batch, step)
        period = step // self.interval
        if period != self._period:
            if self._period_loss[1] > 0 and self.active:
                self._end_period()  # a collective: every rank has losses of the same period here
            self._period = period
            if self.chooser.wants_influence(period):
                self._measure_influence(trainer, pl_module, batch, period)
            self._apply(trainer, self.chooser.choose(period))
            self.history.append(self.active)
        elif not self._applied:  # resumed mid-period: the fresh module has every layer trainable
            self._apply(trainer, self.active)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> None:
        """IST's suppression probes on their batch (:class:`ProbeBatches`), their losses averaged over every rank."""
        assert isinstance(self.chooser, ISTLayers)
        sets = self.chooser.probe_sets(step)
        batch = self.probe_batches(trainer, batch, step // self.chooser.probe_every - 1)  # probe rounds 0, 1, ...
        with parameters_for_direct_forward(trainer):
            local = torch.stack(
                [probe(pl_module, batch, [self.stack[i] for i in layers], self.suppression, self.probe_loss).cpu() for layers in sets]
            ).double()
        losses = (collectives.all_reduce_sum(local) / collectives.world_size()).tolist()
        self.chooser.learn(sets, losses)
        self._probed = step

    def _measure_influence(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, period: int) -> None:
        """Block influence on this step's batch or on ``influence_data`` (eval mode, no gradients),
        the token sums of every rank added before the mean is taken, so every rank records the same values."""
        assert isinstance(self.chooser, BlockInfluenceLayers)
        batches = [batch] if self.influence_data is None else (move_data_to_device(b, pl_module.device) for b in self.influence_data)
        with parameters_for_direct_forward(trainer):
            totals, tokens = influence_totals(pl_module, batches, self.stack, forward=self.probe_loss)
        reduced = collectives.all_reduce_sum(torch.cat([totals, tokens.reshape(1)]))
        self.chooser.record_influence(period, (reduced[:-1] / reduced[-1].clamp(min=1.0)).cpu())

    def _end_period(self) -> None:
        # The period's mean loss over every rank's steps: each rank trained on other data, and a
        # statistic of its own losses alone would make the ranks draw different layers.
        total, count = collectives.all_reduce_sum(self._period_loss).tolist()
        assert self.chooser is not None
        self.chooser.end_period(total / count)
        self._period_loss.zero_()

    def _apply(self, trainer: pl.Trainer, chosen: list[int]) -> None:
        if self._zero is not None:
            self._set_trainable(chosen)
            self._rebuild_zero(trainer.strategy)
        else:
            activate_layers(self.trainable, chosen, trainer.optimizers[0] if trainer.optimizers else None, self.stash, self.masters)
            rewrap_ddp(trainer)  # DDP's reducer covers the parameters that required grad when it was built
            refresh_fsdp2_dtypes(trainer.lightning_module)  # FSDP2 sized its gradient dtypes for the old trainable set
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.active, self._applied = chosen, True
        # One value per layer and period (the whole map goes to W&B as one table at the end: _log_layer_map).
        metrics = {f"weightwise/layer_active/{i:02d}": float(i in chosen) for i in range(len(self.stack))}
        if self.importance is not None:
            metrics.update({f"weightwise/layer_importance/{i:02d}": float(v) for i, v in enumerate(self.importance)})
        if optimizer is not None:
            metrics["weightwise/optimizer_state_mib"] = optimizer_state_bytes(optimizer) / 2**20
        if self._zero is not None:
            from weightwise.integrations.deepspeed import master_partition_bytes

            metrics["weightwise/master_weights_mib"] = master_partition_bytes(optimizer) / 2**20
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._zero is not None:  # the LR scheduler drives the user's optimizer; ZeRO steps the split groups
            self._zero.sync_hyperparameters(optimizer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.chooser is not None and self.chooser.needs_period_loss and isinstance(outputs, dict) and "loss" in outputs:
            self._period_loss += torch.tensor([float(outputs["loss"]), 1.0], dtype=torch.float64)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        policy_state = self.chooser.state_dict() if self.chooser is not None else self._chooser_state
        return with_version(
            {
                "policy": policy_state,
                "history": [list(h) for h in self.history],
                "period": self._period,
                "active": list(self.active),
                "period_loss": self._period_loss.clone(),
                "probed": self._probed,
                "parked": self.stash.state_dict(self._param_names),
                "masters": None if self.masters is None else self.masters.state_dict(self._param_names),
                "optimizer_hyperparameters": None if self._zero is None else self._zero.hyperparameters(),
                "optimizer_state_params": self._parameters_with_state(),
            },
            self.STATE_VERSION,
        )

    def _parameters_with_state(self) -> list[str] | None:
        """Under ``ModelParallelStrategy``: the names of the parameters with optimizer state, which the
        sharded checkpoint's optimizer holds (a resume loads into exactly those; ``_hook_model_parallel``)."""
        optimizer = self._sharded_optimizer()
        return None if optimizer is None else sorted(self._param_names[p] for p in optimizer.state)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_version(state_dict, "LayerwiseSampling", self.STATE_VERSION) == 0:
            if self.policy == "ist":
                raise ValueError(
                    "this checkpoint was written by weightwise 0.1, whose 'ist' policy is now called 'loss_credit' (the"
                    " 'ist' policy follows the IST paper now): resume it with LayerwiseSampling('loss_credit', ...)"
                )
            state_dict = _migrate_unversioned(state_dict)
        self._chooser_state = state_dict["policy"]
        if self.chooser is not None and self._chooser_state is not None:
            self.chooser.load_state_dict(self._chooser_state)
            self._chooser_state = None
        self.history = [list(h) for h in state_dict["history"]]
        self._period = state_dict["period"]
        self.active = list(state_dict["active"])
        self._period_loss = state_dict["period_loss"].clone()
        self._probed = state_dict.get("probed")
        self._parked_to_load = state_dict.get("parked") or None
        saved_masters = state_dict.get("masters")
        if saved_masters and self.masters is None:
            raise ValueError("the checkpoint was written with frozen_dtype (fp32 weights parked on the host): resume with the same frozen_dtype")
        self._masters_to_load = saved_masters or None
        hyperparameters = state_dict.get("optimizer_hyperparameters")
        if self._zero is not None and hyperparameters is not None:
            # DeepSpeed resume (callback state is loaded after the engine is built): the proxy gets lr etc.
            # as the LR scheduler had left them, which DeepSpeed's own optimizer checkpoint does not hold.
            self._zero.load_hyperparameters(hyperparameters)


def _migrate_unversioned(state: dict[str, Any]) -> dict[str, Any]:
    """The layout of weightwise 0.1 (policy state inline, period losses as a list) as version 1."""
    losses = list(state["period_losses"])
    policy = None
    if state.get("importance") is not None:  # the loss-credit policy's scores (zeros under LISA, which ignores them)
        policy = {"version": 1, "scores": state["importance"], "previous_mean": state["previous_mean"], "active": list(state["active"])}
    return {
        **state,
        "policy": policy,
        "period_loss": torch.tensor([sum(losses), float(len(losses))], dtype=torch.float64),
    }


def _optimizers_in(config: Any) -> list[torch.optim.Optimizer]:
    """The optimizers in any return value of ``configure_optimizers`` (object, list, tuple or dict)."""
    if isinstance(config, torch.optim.Optimizer):
        return [config]
    if isinstance(config, dict):
        return _optimizers_in(config.get("optimizer"))
    if isinstance(config, (list, tuple)):
        return [optimizer for item in config for optimizer in _optimizers_in(item)]
    return []
