"""A DeepSpeed ZeRO optimizer (stage 1, 2 or 3) whose set of trainable parameters changes during training.

Why a rebuild: a ZeRO engine flattens every parameter that is trainable when its optimizer is
built into bit16 buffers, an fp32 master partition and the optimizer's state, and keeps them for
good; ``requires_grad=False`` afterwards only skips gradient work (measured in
``benchmarks/deepspeed_layer_freezing.py``: 14 of 16 layers frozen mid-run keep 100.6 MiB of Adam
state, frozen before the engine starts 16.1 MiB). Layerwise sampling (LISA, IST) changes the
trainable layers every period, so :class:`ZeroLayerOptimizer` builds the engine's ZeRO optimizer
anew for each period's trainable parameters.

The layout that makes this exact: the user's param groups are split into one group per
``(user group, layer)`` (``layer`` is ``None`` for parameters outside the layer stack, e.g.
embeddings and head). ZeRO flattens and partitions each group on its own, so a group with the same
parameters has the same partition on every rank in every rebuild: its fp32 master and its optimizer
state (Adam's moments *and* ``step``, which ZeRO keeps per group) are carried over as whole tensors,
with no communication. A layer that leaves the active set drops its state (LISA's memory saving,
``optimizer_state="release"``) and starts fresh when it returns, like ``torch.optim`` parameters
that are released one by one on a single device - so ZeRO-1/2 trains exactly like DDP (ZeRO-3 to
float rounding, as it does without this module). ZeRO-3 partitions the parameters themselves and
gathers them with module hooks: destroying its optimizer removes those hooks and the new one
registers them again; frozen parameters keep their partitions (``ds_tensor``).

The user's optimizer stays the object the LR scheduler drives (the *proxy*); its group
hyper-parameters (``lr``, ``weight_decay``, ...) are copied into the split groups before every step
(:meth:`ZeroLayerOptimizer.sync_hyperparameters`).

Uses DeepSpeed's engine method ``_configure_optimizer`` (private; the one ``deepspeed.initialize``
calls) and the ZeRO optimizers' ``destroy()``, master partitions (``single_partition_of_fp32_groups``,
ZeRO-3 ``fp32_partitioned_groups_flat``, ``sub_group_to_group_id``) and parameter lists
(``bit16_groups``, ``bit16_groups_flat``, ``fp16_groups``, ``fp16_partitioned_groups_flat``,
``ds_tensor``), and ZeRO-3's link from every parameter to its optimizer (``_z3_optimizer``, cleared
so the old optimizer is freed before the new one is built). :func:`check_version` and :func:`check_engine` verify them at start-up; tested with
DeepSpeed 0.19 (a rebuild leaks the previous optimizer's buffers before 0.14.5, the minimum).
"""

from __future__ import annotations

import gc
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightwise.integrations.torch import mark_stepped
from weightwise.integrations.versions import require

MINIMUM = "0.14.5"
TESTED = ">=0.14.5,<0.20"
_PURPOSE = "LayerwiseSampling under DeepSpeed"

def check_version() -> None:
    """Raise, naming the versions, unless DeepSpeed has what the ZeRO rebuild relies on.

    Raises:
        UnsupportedVersionError: DeepSpeed older than 0.14.5, or a piece is missing.
    """
    missing: list[str] = []
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError as error:
        missing.append(f"an importable ZeRO ({error})")
    else:
        if not callable(getattr(DeepSpeedEngine, "_configure_optimizer", None)):
            missing.append("DeepSpeedEngine._configure_optimizer")
        missing += [f"{cls.__name__}.destroy" for cls in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3) if not hasattr(cls, "destroy")]
    require("deepspeed", MINIMUM, TESTED, missing, purpose=_PURPOSE)


_ENGINE_ATTRIBUTES = {
    "DeepSpeedZeroOptimizer": ("single_partition_of_fp32_groups", "bit16_groups", "bit16_groups_flat"),
    "DeepSpeedZeroOptimizer_Stage3": ("fp32_partitioned_groups_flat", "sub_group_to_group_id", "fp16_groups", "fp16_partitioned_groups_flat"),
}


def check_engine(engine: Any) -> None:
    """Raise, naming the version, unless the built engine's ZeRO optimizer has the attributes used.

    Raises:
        UnsupportedVersionError: an attribute is missing.
        TypeError: the engine's optimizer is not a ZeRO optimizer (see :func:`master_partitions`).
        ValueError: the engine was compiled (``engine.compile()``): the per-period rebuild was not tested with it.
    """
    if getattr(engine, "is_compiled", False):
        raise ValueError(
            "the DeepSpeed engine was compiled (engine.compile()), which the per-period ZeRO rebuild of LayerwiseSampling"
            " was not tested with: leave the engine uncompiled (torch.compile the LightningModule's submodules instead)"
        )
    master_partitions(engine.optimizer)  # the type check
    expected = _ENGINE_ATTRIBUTES.get(type(engine.optimizer).__name__, ())
    missing = [f"{type(engine.optimizer).__name__}.{name}" for name in expected if not hasattr(engine.optimizer, name)]
    if _is_stage3(engine.optimizer) and not all(getattr(p, "_z3_optimizer", None) is engine.optimizer for p in engine.module.parameters()):
        missing.append("Parameter._z3_optimizer (ZeRO-3's link from a parameter to its optimizer)")
    require("deepspeed", MINIMUM, TESTED, missing, purpose=_PURPOSE)


def unsupported_settings(config: Mapping[str, Any], precision: str | None = None) -> list[str]:
    """What in a DeepSpeed config (and the Trainer's ``precision``) the per-period ZeRO rebuild does not
    support, each with its fix. Lightning writes the ``fp16`` section into the config only when the
    strategy is set up, after the callbacks' ``setup``: ``precision`` catches fp16 before that."""
    zero = config.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    problems = [
        (zero.get("stage") not in (1, 2, 3), f"ZeRO stage {zero.get('stage')}: use stage 1, 2 or 3"),
        (offload not in ("none", None), "ZeRO-Offload (offload_optimizer): remove it"),
        ("optimizer" in config, "an optimizer in the DeepSpeed config: return it from configure_optimizers instead"),
        # A rebuild creates a fresh loss scaler: fp16's dynamic scale would restart at its initial value.
        (
            bool((config.get("fp16") or {}).get("enabled")) or str(precision) in ("16", "16-mixed", "16-true"),
            "fp16 (its dynamic loss scale would restart every period): use bf16 (Trainer(precision='bf16-mixed'))",
        ),
        (bool(zero.get("mics_shard_size", -1) > 0), "MiCS (zero_optimization.mics_shard_size): remove it"),
        ("zenflow" in zero or "zenflow" in config, "ZenFlow: remove it"),
        (bool((config.get("compile") or {}).get("deepcompile")), "DeepCompile: remove compile.deepcompile"),
    ]
    return [message for bad, message in problems if bad]


GROUP_KEY = "weightwise_group"
"""Param-group entry naming a split group: ``(index of the user's group, layer index or None)``."""

GroupKey = tuple[int, int | None]


class ZeroLayerOptimizer:
    """Builds a DeepSpeed engine's ZeRO optimizer anew for the parameters that require grad.

    Args:
        proxy: the optimizer ``configure_optimizers`` returned, before DeepSpeed wrapped it.
        layer_of: the layer index of every parameter that may train (``None`` outside the stack).
        size_buckets: at every rebuild, cap ZeRO's gradient buckets (``reduce_bucket_size``, and
            ZeRO-1/2's ``allgather_bucket_size``) at the element count of the largest trainable
            group (one layer, or the parameters outside the stack) - never above the configured
            size. ZeRO-1/2 allocate their reduce buckets at that size every step (two with
            ``overlap_comm``) and ZeRO-3 one for good, sized for the configuration whatever
            trains: with 2e8 elements (Lightning's default) that is 1.5 GiB of fp32 buckets under
            ZeRO-2 however few layers train (measured: ``benchmarks/memory/per_rank.py``). A bucket
            of one layer still reduces a layer per call; the reduced values are the same.
            ZeRO-3's ``stage3_prefetch_bucket_size`` and ``stage3_max_live_parameters`` are left
            as configured: frozen layers are gathered for forward and backward too.
    """

    def __init__(self, proxy: torch.optim.Optimizer, layer_of: Mapping[nn.Parameter, int | None], size_buckets: bool = True) -> None:
        self.proxy = proxy
        self.size_buckets = size_buckets
        self._configured_buckets: dict[str, int] | None = None  # the user's sizes, read at the first rebuild
        # Recorded before ZeRO replaces each group's "params" with its flat fp32 partition.
        self.groups = list(proxy.param_groups)
        self.members = [list(group["params"]) for group in self.groups]
        self.layer_of = layer_of

    def hide_untrainable_groups(self) -> None:
        """Call before DeepSpeed builds its engine from the proxy.

        ZeRO-1/2 fails on a param group without trainable parameters, and freezing all but period
        0's layers can empty one (per-layer learning rates, a norms-only group under LoRA). Such
        groups are left out of the proxy until the first :meth:`rebuild` puts every group back -
        which runs before the LR scheduler or a logger reads the groups.
        """
        self.proxy.param_groups[:] = [g for g in self.groups if any(p.requires_grad for p in g["params"])]

    def split_groups(self) -> list[tuple[GroupKey, list[nn.Parameter]]]:
        """The ``(user group, layer)`` groups of the parameters that require grad now, in a fixed order."""
        split: dict[GroupKey, list[nn.Parameter]] = {}
        for g, params in enumerate(self.members):
            for p in params:
                if p.requires_grad and p in self.layer_of:
                    split.setdefault((g, self.layer_of[p]), []).append(p)
        return sorted(split.items(), key=lambda item: (item[0][0], -1 if item[0][1] is None else item[0][1]))

    def rebuild(self, engine: Any) -> None:
        """Give ``engine`` a ZeRO optimizer for the parameters that require grad now.

        State of groups that stay trainable is carried; state of the others is released. Nothing
        happens when the engine's optimizer already has this layout.
        """
        old = engine.optimizer
        old_masters = master_partitions(old)
        wanted = self.split_groups()
        if not wanted:
            raise RuntimeError("no parameter requires grad: nothing left to train")
        if [group.get(GROUP_KEY) for group in old.optimizer.param_groups] == [key for key, _ in wanted]:
            return
        carried = _carried_state(old, old_masters, {key for key, _ in wanted})
        stage3 = _is_stage3(old)
        old.destroy()  # removes ZeRO's gradient hooks (and ZeRO-3's module hooks)
        for params in old.fp16_groups if stage3 else old.bit16_groups:
            for p in params:
                p.grad = None
                if not p.requires_grad:  # its data is a view into the old flat buffer: give it its own storage
                    if stage3:
                        p.ds_tensor.data = p.ds_tensor.data.clone()  # ZeRO-3: the rank's partition of p
                    else:
                        p.data = p.data.clone()
        # Let the old optimizer go before the new one allocates its buffers, which would otherwise exist
        # twice for a moment (on an H200 under ZeRO-3, LISA and IST peaked above full fine-tuning before
        # this; benchmarks/RESULTS.md). Only the carried masters and states stay. The caller drops its own references first
        # (LayerwiseSampling: Lightning's strategy.optimizers).
        basic = self._basic_optimizer(wanted)
        self._restore_proxy_groups()
        if stage3:  # ZeRO-3 links every parameter to its optimizer (p._z3_optimizer); the new one links them anew
            for p in engine.module.parameters():
                p._z3_optimizer = None
        del old, old_masters
        engine.optimizer = engine.basic_optimizer = None
        if stage3:
            gc.collect()  # ZeRO-3 optimizers hold reference cycles (ZeRO-1/2 ones go with their last reference)
        if self.size_buckets:
            # ZeRO-3 parameters are partitioned (numel 0 outside a gather): count their full size, ds_numel
            self._size_buckets(engine, max(sum(getattr(p, "ds_numel", p.numel()) for p in params) for _, params in wanted))
        engine._configure_optimizer(basic, None)
        new = engine.optimizer
        for group, target in zip(new.optimizer.param_groups, master_partitions(new)):
            if group[GROUP_KEY] not in carried:
                continue
            master, state = carried[group[GROUP_KEY]]
            if master.shape != target.shape:
                raise RuntimeError(f"group {group[GROUP_KEY]}: partition {tuple(master.shape)} became {tuple(target.shape)}")
            target.data.copy_(master)
            if state:
                new.optimizer.state[target] = state

    def _size_buckets(self, engine: Any, largest_group: int) -> None:
        """Cap the engine's bucket sizes at ``largest_group`` elements (read by the ZeRO optimizer's constructor)."""
        zero = engine._config.zero_config
        names = ("reduce_bucket_size", "allgather_bucket_size")
        if self._configured_buckets is None:
            self._configured_buckets = {name: int(getattr(zero, name)) for name in names}
        for name in names:
            setattr(zero, name, min(self._configured_buckets[name], int(largest_group)))

    def _restore_proxy_groups(self) -> None:
        """The proxy gets all its groups back, with the model's parameters instead of the first
        engine's partitions (so it no longer holds them)."""
        self.proxy.param_groups[:] = self.groups
        for group, params in zip(self.groups, self.members):
            group["params"] = params
        self.proxy.state.clear()

    def _basic_optimizer(self, wanted: Sequence[tuple[GroupKey, list[nn.Parameter]]]) -> torch.optim.Optimizer:
        """A fresh optimizer of the user's class with one param group per split group."""
        groups = [{**self._hyperparameters(key[0]), "params": params, GROUP_KEY: key} for key, params in wanted]
        cls = type(self.proxy)
        accepted = inspect.signature(cls.__init__).parameters
        try:
            return cls(groups, **{k: v for k, v in self.proxy.defaults.items() if k in accepted})
        except TypeError as error:
            raise TypeError(
                f"cannot create {cls.__name__}(param_groups, **defaults) for the per-layer ZeRO groups ({error});"
                " use a torch.optim optimizer"
            ) from error

    def _hyperparameters(self, g: int) -> dict[str, Any]:
        return {k: v for k, v in self.proxy.param_groups[g].items() if k != "params"}

    def sync_hyperparameters(self, optimizer: torch.optim.Optimizer) -> None:
        """Copy the proxy's hyper-parameters (set by the LR scheduler) into ``optimizer``'s split groups."""
        for group in optimizer.param_groups:
            group.update(self._hyperparameters(group[GROUP_KEY][0]))
        # torch's LR schedulers warn "lr_scheduler.step() before optimizer.step()" unless the
        # optimizer they drive has stepped; the proxy's parameters are stepped, through the split groups.
        mark_stepped(self.proxy)

    def hyperparameters(self) -> list[dict[str, Any]]:
        """The proxy's group hyper-parameters, for checkpoints (DeepSpeed does not save the proxy)."""
        return [self._hyperparameters(g) for g in range(len(self.members))]

    def load_hyperparameters(self, saved: Sequence[Mapping[str, Any]]) -> None:
        if len(saved) != len(self.proxy.param_groups):
            raise ValueError(f"the checkpoint has {len(saved)} optimizer param groups, the optimizer {len(self.proxy.param_groups)}")
        for group, values in zip(self.proxy.param_groups, saved):
            group.update(values)


def _carried_state(old: Any, old_masters: Sequence[torch.Tensor], keep: set[GroupKey]) -> dict[GroupKey, tuple[torch.Tensor, dict[str, Any]]]:
    """The fp32 master partition and optimizer state of every group of ``old`` that stays (``keep``).

    A function of its own so that no loop variable outlives it: in ``rebuild`` the last group's
    master and moments stayed referenced while the new optimizer was built (16 bytes per parameter
    of a leaving layer, per rank)."""
    carried: dict[GroupKey, tuple[torch.Tensor, dict[str, Any]]] = {}
    for group, master in zip(old.optimizer.param_groups, old_masters):
        state = old.optimizer.state.get(master, {})
        key = group.get(GROUP_KEY)
        if key is None and state:
            raise RuntimeError(
                "the DeepSpeed optimizer already stepped with the user's param groups; the per-layer layout must"
                " be set up before the first step"
            )
        if key in keep:
            carried[key] = (master, state)
    return carried


def _is_stage3(optimizer: Any) -> bool:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    return isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3)


def master_partitions(optimizer: Any) -> list[torch.Tensor]:
    """This rank's fp32 master partition of each param group of a ZeRO-1/2/3 optimizer.

    The base optimizer's state is keyed by these tensors. ZeRO-3 may split a group into sub-groups
    (``sub_group_size``); a group must stay one sub-group here so that it carries over whole.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return list(optimizer.single_partition_of_fp32_groups)
    if _is_stage3(optimizer):
        groups = [optimizer.sub_group_to_group_id[i] for i in range(len(optimizer.fp32_partitioned_groups_flat))]
        if groups != list(range(len(optimizer.optimizer.param_groups))):
            raise RuntimeError(
                "ZeRO-3 split a layer's param group into sub-groups: raise zero_optimization.sub_group_size above the"
                " largest layer's parameter count"
            )
        return list(optimizer.fp32_partitioned_groups_flat)
    raise TypeError(
        f"layerwise sampling under DeepSpeed needs a ZeRO optimizer (stage 1, 2 or 3), got {type(optimizer).__name__};"
        " with bf16, ZeRO-1 uses DeepSpeed's BF16 optimizer instead - use stage 2"
    )


def flat_buffers(optimizer: Any) -> list[torch.Tensor]:
    """A ZeRO optimizer's flat buffers of trainable (bit16) parameters on this rank (ZeRO-3: its partitions)."""
    master_partitions(optimizer)  # the same type check and error
    return list(optimizer.fp16_partitioned_groups_flat if _is_stage3(optimizer) else optimizer.bit16_groups_flat)


def master_partition_bytes(optimizer: Any) -> int:
    """Bytes of a ZeRO optimizer's fp32 master partitions on this rank."""
    return sum(t.numel() * t.element_size() for t in master_partitions(optimizer))


def read_client_state(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The client state (Lightning's checkpoint dict without weights) of a DeepSpeed checkpoint directory.

    DeepSpeed writes it to ``<dir>/<tag>/mp_rank_00_model_states.pt`` (ZeRO-1/2, with the module
    weights) or ``zero_pp_rank_0_mp_rank_00_model_states.pt`` (ZeRO-3); ``<tag>`` comes from
    ``<dir>/latest`` (Lightning's is ``"checkpoint"``). The file is memory-mapped, so weights are not read.
    """
    root = Path(checkpoint_dir)
    tag = (root / "latest").read_text().strip() if (root / "latest").is_file() else "checkpoint"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (root / tag / name).is_file():
            return torch.load(root / tag / name, map_location="cpu", mmap=True, weights_only=False)
    raise FileNotFoundError(f"no model states file in {root / tag}: {root} is not a DeepSpeed checkpoint directory")
