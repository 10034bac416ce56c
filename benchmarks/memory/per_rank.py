"""Per-rank memory on CPU ranks: what each of 2 gloo ranks holds under DDP, ZeRO-1/2/3 and FSDP2, measured.

No GPU needed: every live tensor of the process is found (``gc``), de-duplicated by storage and
counted once, in the first of these kinds that claims its storage (a DTensor - FSDP2's parameters,
gradients and Adam moments - by the storage of its local shard, ``to_local()``):

* ``optimizer_state`` - the fp32 master partitions of a ZeRO optimizer and the base optimizer's
  state (Adam's moments);
* ``parameters`` - the module's parameters and buffers (ZeRO-1/2: the flat buffers they are views
  of; ZeRO-3: each rank's partitions ``ds_tensor``; FSDP2: each rank's shard of every parameter,
  ``FSDPParam.sharded_param``);
* ``gathered`` - FSDP2 only: the all-gathered unsharded parameters (``FSDPParam._unsharded_param``
  and its all-gather output), alive from a group's forward (or pre-backward) all-gather until it
  reshards;
* ``gradients`` - ``.grad`` of the parameters and of the master partitions, the reduced
  gradient partitions a ZeRO optimizer holds before its step (ZeRO-1/2 ``averaged_gradients``,
  ZeRO-3 ``grad_partitions_flat_buffer``), and FSDP2's sharded gradients and the unsharded ones
  autograd produced before their group's reduce-scatter;
* ``engine`` - any other tensor reachable from the ZeRO optimizer (gradient buckets, ZeRO-3's
  gradient partitions and prefetch state) or from FSDP2's states (the reduce-scatter input buffers
  it keeps in flight, the all-gather buffers);
* ``other`` - the rest (batches, activations, metrics, ...).

Snapshots per rank: under FSDP2, in each decoder layer's backward (when the gradient reaches the
layer's input: the layer is still gathered, its weight gradients exist and are not yet
reduce-scattered), late in backward (when the gradient reaches the embeddings' output: every other
gradient exists and ZeRO's reduce buckets are allocated), after backward
(``on_before_optimizer_step``), after the optimizer step, and around every rebuild of the ZeRO optimizer by ``LayerwiseSampling``
(right before the new optimizer is built: how many bytes of the *leaving* groups' masters and
moments are still alive - the old ZeRO rebuild kept the previous optimizer alive there, and its loop
variables the last group's). DDP's reducer buckets live in C++ and are not seen (4 B per trainable
parameter, not counted); the expectation below leaves them out too. Each snapshot also records the
bytes of optimizer state and gradients that *frozen* parameters hold (none, when freezing releases).

Analytic expectation per rank (fp32, W ranks, P parameters, A trainable now):

* parameters: 4P (DDP, ZeRO-1/2); 4P/W + parameters ZeRO-3 keeps whole (below the persistence
  threshold) for ZeRO-3; 4P/W for FSDP2;
* optimizer state: 8A (DDP: Adam's two moments), 12A/W (ZeRO: fp32 master + two moments, sharded),
  8A/W (FSDP2: the moments of each rank's shards; the fp32 parameter shard is the master);
* gradients after backward: 4A (DDP), 4A/W (ZeRO-2/3 partitions, FSDP2's sharded gradients; ZeRO-1
  reduces whole gradients);
* FSDP2, gathered late in backward: 4 B per parameter outside the decoder layers (embeddings,
  final norm, head): ``fully_shard`` keeps the root's group unsharded from forward to the end of
  backward; every layer's group has resharded by then (``reshard_after_forward=True``); in a
  layer's backward, that layer's parameters too.
  FSDP2 pads each parameter's dim 0 to a multiple of W: a rank's shard holds up to one row per
  parameter tensor more (or, for the moments of the last rank's shorter shard, less), a gathered
  parameter up to W - 1 rows more, and Adam keeps a 4-byte ``step`` per parameter tensor - the
  ``slack`` recorded with each snapshot.

Run: ``.venv/bin/python -m benchmarks.memory.per_rank`` (about 12 minutes on 2 cores; ``--quick``
for one configuration). The 2 ranks are Lightning's own strategies on CPU, bridged as the tests do
(``tests/support/strategies.py``); FSDP2 is Lightning's ``ModelParallelStrategy`` as it is, with a
data-parallel mesh of both ranks (its default, ``data_parallel_size=num_nodes``, would make the
2 ranks one tensor-parallel group and shard nothing over a 1-rank data-parallel mesh).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from weightwise.layers import find_layer_stack

os.environ.setdefault("DS_ACCELERATOR", "cpu")

MIB = 2**20
KINDS = ("parameters", "gathered", "gradients", "optimizer_state", "engine", "other")
RESULTS = Path(__file__).parent / "results"


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2's parameters, gradients, Adam moments), else ``t``."""
    if isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


def _key(t: torch.Tensor) -> tuple[int, str] | None:
    t = _local(t)
    if t.device.type == "meta" or t.is_sparse:
        return None
    storage = t.untyped_storage()
    return (storage.data_ptr(), str(t.device)) if storage.nbytes() else None


def _reachable_tensors(root: Any, depth: int = 6, within: str = "") -> Iterator[torch.Tensor]:
    """Tensors reachable from ``root`` through attributes, lists, tuples and dicts (not into modules;
    attributes only of objects whose class is defined in a module named ``within...``)."""
    seen: set[int] = set()
    frontier = [root]
    for _ in range(depth):
        found = []
        for obj in frontier:
            if obj is None or id(obj) in seen or isinstance(obj, nn.Module):
                continue
            seen.add(id(obj))
            if isinstance(obj, torch.Tensor):
                yield obj
                continue
            if isinstance(obj, dict):
                found += list(obj.values())
            elif isinstance(obj, (list, tuple, set)):
                found += list(obj)
            elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.startswith(within):
                found += list(vars(obj).values())
        frontier = found


def zero_optimizers_alive() -> int:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return sum(isinstance(o, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)) for o in gc.get_objects())


def fsdp_states(module: nn.Module) -> list[Any]:
    """FSDP2's state of every ``fully_shard``-ed submodule (``FSDPModule._get_fsdp_state``, private)."""
    from torch.distributed.fsdp import FSDPModule

    return [m._get_fsdp_state() for m in module.modules() if isinstance(m, FSDPModule)]


def fsdp_params(module: nn.Module) -> list[Any]:
    """FSDP2's per-parameter records (``FSDPParam``: the sharded DTensor parameter, the all-gathered
    unsharded one and its all-gather output) of every parameter group (private attributes)."""
    return [p for state in fsdp_states(module) for group in state._fsdp_param_groups for p in group.fsdp_params]


def breakdown(module: nn.Module, optimizer: Any, largest: dict[str, list] | None = None) -> dict[str, int]:
    """Bytes of every live tensor storage of this process, by kind (see the module doc). ``largest``,
    if given, receives the shapes and bytes of the 3 largest storages of each kind."""
    from weightwise.integrations import deepspeed

    gc.collect()
    zero = optimizer if type(optimizer).__name__.startswith("DeepSpeedZeroOptimizer") else None
    basic = zero.optimizer if zero is not None else optimizer
    masters = deepspeed.master_partitions(zero) if zero is not None else []
    fsdp = fsdp_params(module)
    claims: dict[tuple[int, str], str] = {}

    def claim(kind: str, tensors: Iterable[torch.Tensor | None]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and (key := _key(t)) is not None:
                claims.setdefault(key, kind)

    params = list(module.parameters())
    unsharded = [getattr(p, "_unsharded_param", None) for p in fsdp]
    claim("optimizer_state", masters)
    claim("optimizer_state", (v for state in basic.state.values() for v in state.values()))
    claim("parameters", [p.sharded_param for p in fsdp])  # FSDP2: this rank's shards
    claim("gathered", [*unsharded, *(t for p in fsdp for t in p.all_gather_outputs)])
    claim("parameters", params + list(module.buffers()) + [getattr(p, "ds_tensor", None) for p in params])
    claim("gradients", [p.grad for p in params] + [m.grad for m in masters])
    claim("gradients", [p.sharded_param.grad for p in fsdp] + [u.grad for u in unsharded if u is not None])
    claim("gradients", [p.unsharded_accumulated_grad for p in fsdp])
    if zero is not None:  # the reduced gradient partitions before the step: ZeRO-1/2, ZeRO-3
        claim("gradients", _reachable_tensors(getattr(zero, "averaged_gradients", None), depth=3))
        claim("gradients", [getattr(zero, "grad_partitions_flat_buffer", None)])
        claim("engine", _reachable_tensors(zero))
    for state in fsdp_states(module):  # FSDP2's all-gather and reduce-scatter buffers
        claim("engine", _reachable_tensors(state, depth=8, within="torch.distributed"))
    totals = dict.fromkeys(KINDS, 0)
    counted: set[tuple[int, str]] = set()
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and (key := _key(obj)) is not None and key not in counted:
            counted.add(key)
            kind, nbytes = claims.get(key, "other"), _local(obj).untyped_storage().nbytes()
            totals[kind] += nbytes
            if largest is not None:
                largest.setdefault(kind, []).append((nbytes, list(obj.shape), str(obj.dtype)))
    if largest is not None:
        for kind in largest:
            largest[kind] = sorted(largest[kind], reverse=True)[:3]
    return totals


def numel(p: torch.Tensor) -> int:
    """A parameter's element count, also when ZeRO-3 has partitioned it (its ``numel()`` is then 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def expected(
    module: nn.Module, strategy: str, world: int, persistence_threshold: int = 0, moment: str = "step", layer: int | None = None
) -> dict[str, float]:
    """The analytic per-rank bytes (module doc) for the parameters trainable now, at ``moment`` (in
    ``layer``'s backward for ``"in_layer_backward"``)."""
    total = sum(numel(p) for p in module.parameters())
    active = sum(numel(p) for p in module.parameters() if p.requires_grad)
    whole = sum(numel(p) for p in module.parameters() if numel(p) < persistence_threshold)
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    if strategy == "ddp":
        return {"parameters": 4 * total + buffers, "optimizer_state": 8 * active, "gradients": 4 * active}
    if strategy == "fsdp2":
        # the root's group (everything outside the decoder layers) stays gathered from forward to the end of backward
        _, stack = find_layer_stack(module)
        outside = total - sum(p.numel() for p in stack.parameters())
        gathered = 4 * outside if moment == "in_backward" else 0
        if moment == "in_layer_backward":  # and the layer whose backward runs
            gathered = 4 * (outside + sum(p.numel() for p in stack[layer].parameters()))
        return {"parameters": 4 * total / world + buffers, "gathered": gathered, "optimizer_state": 8 * active / world,
                "gradients": 4 * active / world}
    params = 4 * (total - whole) / world + 4 * whole if strategy == "zero3" else 4 * total
    return {"parameters": params + buffers, "optimizer_state": 12 * active / world, "gradients": 4 * active / world}


def slack(module: nn.Module, strategy: str, world: int) -> dict[str, int]:
    """How far from :func:`expected` a rank may be by construction: FSDP2's dim-0 padding (a shard
    has up to one row per parameter tensor more, a gathered tensor up to W - 1) and Adam's 4-byte
    ``step`` per tensor; nothing for the other strategies."""
    if strategy != "fsdp2":
        return dict.fromkeys(("parameters", "gathered", "optimizer_state", "gradients"), 0)
    rows = {p: numel(p) // p.shape[0] for p in module.parameters()}
    active = [p for p in module.parameters() if p.requires_grad]
    return {
        "parameters": 4 * sum(rows.values()),
        "gathered": 4 * (world - 1) * sum(rows.values()),
        "optimizer_state": 8 * sum(rows[p] for p in active) + 4 * len(active),
        "gradients": 4 * sum(rows[p] for p in active),
    }


def frozen_holding(module: nn.Module, optimizer: Any) -> dict[str, int]:
    """Bytes of optimizer state and gradients (this rank's shards) that frozen parameters hold (under
    FSDP2 the sharded parameters: the optimizer's keys, also while a group is gathered)."""
    params = [p.sharded_param for p in fsdp_params(module)] or list(module.parameters())
    frozen = [p for p in params if not p.requires_grad]
    state = getattr(optimizer, "state", {})
    return {
        "optimizer_state": sum(_local(v).untyped_storage().nbytes() for p in frozen for v in state.get(p, {}).values() if isinstance(v, torch.Tensor)),
        "gradients": sum(_local(p.grad).untyped_storage().nbytes() for p in frozen if p.grad is not None),
    }


class PerRankMemory(pl.Callback):
    """Records :func:`breakdown` after backward and after each step, and around ZeRO rebuilds.

    Put it first in ``callbacks`` so that it wraps the engine before ``LayerwiseSampling`` rebuilds.
    ``plant`` re-creates an old behaviour of the rebuild for the check that must catch it:
    ``"old_optimizer"`` keeps the previous ZeRO optimizer referenced while the new one is built
    (as Lightning's ``strategy.optimizers`` did), ``"loop_variables"`` keeps the last old group's
    master and state (the loop variables of ``rebuild`` before they moved into a function).
    """

    def __init__(self, strategy: str, persistence_threshold: int = 0, plant: str | None = None, steps: Iterable[int] = ()) -> None:
        self.strategy, self.persistence_threshold, self.plant = strategy, persistence_threshold, plant
        self.steps = set(steps)  # steps to snapshot (all when empty)
        self.records: list[dict[str, Any]] = []
        self.rebuilds: list[dict[str, Any]] = []
        self._leaving: list[weakref.ref] = []
        self._planted: list[Any] = []

    def _wanted(self, step: int) -> bool:
        return not self.steps or step in self.steps

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, moment: str, step: int, layer: int | None = None) -> None:
        largest: dict[str, list] = {}
        measured = breakdown(pl_module, trainer.optimizers[0], largest)
        analytic = expected(pl_module, self.strategy, trainer.world_size, self.persistence_threshold, moment, layer)
        active = sum(numel(p) for p in pl_module.parameters() if p.requires_grad)
        self.records.append({
            "step": step, "moment": moment, "layer": layer, "active": active, "measured": measured, "expected": analytic, "largest": largest,
            "slack": slack(pl_module, self.strategy, trainer.world_size), "frozen_holding": frozen_holding(pl_module, trainer.optimizers[0]),
        })

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is None:
            return
        from weightwise.integrations import deepspeed

        configure, rebuild = engine._configure_optimizer, deepspeed.ZeroLayerOptimizer.rebuild
        probe = self

        def observed_configure(*args: Any, **kwargs: Any) -> Any:
            gc.collect()
            alive = [ref() for ref in probe._leaving]
            probe.rebuilds.append({
                "step": trainer.global_step,
                "leaving_alive_bytes": sum(t.untyped_storage().nbytes() for t in alive if t is not None),
                "leaving_bytes": probe._leaving_bytes,
                "largest_group": probe._largest_group,
                "reduce_bucket_size": engine.zero_reduce_bucket_size(),
                "zero_optimizers_alive": zero_optimizers_alive(),
            })
            del alive
            result = configure(*args, **kwargs)
            probe._planted.clear()
            return result

        def observed_rebuild(zero_layers: Any, engine: Any) -> Any:
            # Weak references to the masters and moments of the groups that leave, before the rebuild.
            old = engine.optimizer
            wanted = {key for key, _ in zero_layers.split_groups()}
            leaving = [
                t
                for group, master in zip(old.optimizer.param_groups, deepspeed.master_partitions(old))
                if group.get(deepspeed.GROUP_KEY) not in wanted
                for t in [master, *(v for v in old.optimizer.state.get(master, {}).values() if isinstance(v, torch.Tensor))]
            ]
            probe._leaving = [weakref.ref(t) for t in leaving]
            probe._leaving_bytes = sum(t.untyped_storage().nbytes() for t in leaving)
            probe._largest_group = max(sum(numel(p) for p in params) for _, params in zero_layers.split_groups())
            if probe.plant == "old_optimizer":
                probe._planted.append(old)
            elif probe.plant == "loop_variables" and old.optimizer.param_groups:
                last = deepspeed.master_partitions(old)[-1]
                probe._planted.append((last, old.optimizer.state.get(last, {})))
            del old, leaving
            return rebuild(zero_layers, engine)

        engine._configure_optimizer = observed_configure
        deepspeed.ZeroLayerOptimizer.rebuild = observed_rebuild
        self._restore = (deepspeed.ZeroLayerOptimizer, rebuild)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if hasattr(self, "_restore"):
            cls, rebuild = self._restore
            cls.rebuild = rebuild

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # In backward, when the gradient reaches the embeddings' output: every other gradient has been
        # produced and ZeRO's reduce buckets are allocated - the late-backward peak. Under FSDP2 also
        # when it reaches each decoder layer's input: that layer is still gathered and its weight
        # gradients not yet reduce-scattered - the peak is one of these.
        if not self._wanted(trainer.global_step):
            return

        def snapshot_in_backward(tensor: Any, moment: str, **where: int) -> None:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:  # not below the lowest trainable layer
                tensor.register_hook(lambda grad: self._record(trainer, pl_module, moment, trainer.global_step, **where))

        def on_output(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            handles.pop("embedding").remove()
            snapshot_in_backward(output, "in_backward")

        def on_layer_input(index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
            # registered after fully_shard's pre-forward hook: the tensor the layer itself receives
            handles.pop(index).remove()
            snapshot_in_backward(args[0] if args else kwargs.get("hidden_states"), "in_layer_backward", layer=index)

        embedding = next(m for m in pl_module.modules() if isinstance(m, nn.Embedding))
        handles: dict[str | int, Any] = {"embedding": embedding.register_forward_hook(on_output)}
        if self.strategy == "fsdp2":
            for i, layer in enumerate(find_layer_stack(pl_module)[1]):
                handles[i] = layer.register_forward_pre_hook(functools.partial(on_layer_input, i), with_kwargs=True)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._wanted(trainer.global_step):
            self._record(trainer, pl_module, "backward", trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._wanted(trainer.global_step - 1):  # the step just taken
            self._record(trainer, pl_module, "step", trainer.global_step - 1)


class LlamaLM(pl.LightningModule):
    """A small Llama language model on byte-level text (Python's own ``inspect`` source)."""

    def __init__(self, hidden: int = 512, layers: int = 8, vocab: int = 2048) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
        )
        self.model = LlamaForCausalLM(config)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): ``fully_shard`` every decoder layer, then the root."""
        from lightning.pytorch.strategies import ModelParallelStrategy
        from torch.distributed.fsdp import fully_shard

        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def text_loader(batches: int, batch_size: int = 2, length: int = 64, vocab: int = 2048) -> DataLoader:
    import inspect

    data = torch.tensor(list(inspect.getsource(inspect).encode()[: batches * batch_size * length * 2]))
    rows = (data % vocab).view(-1, length)
    return DataLoader([{"input_ids": r} for r in rows], batch_size=batch_size)


def measure(
    strategy: str,
    method: str,
    steps: int,
    plant: str | None = None,
    size_buckets: bool = True,
    hidden: int = 512,
    layers: int = 8,
    snapshot_steps: Iterable[int] = (),
    bucket_elements: int | None = None,
) -> dict[str, Any]:
    """One 2-rank fit; returns this rank's records. ``bucket_elements`` sets the DeepSpeed config's
    bucket sizes (what a user sets for full training)."""
    from lightning.pytorch import seed_everything
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tests.support.strategies import CPUDeepSpeedStrategy
    from weightwise.callbacks import LayerwiseSampling
    from weightwise.integrations import deepspeed

    seed_everything(0)
    persistence = 0
    if strategy in ("ddp", "fsdp2"):
        engine_strategy: Any = "ddp" if strategy == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        # Full training gets no rebuild: "sized" buckets are then set by hand to one layer's parameter count.
        buckets = {"reduce_bucket_size": bucket_elements, "allgather_bucket_size": bucket_elements} if bucket_elements else {}
        engine_strategy = CPUDeepSpeedStrategy(
            stage=int(strategy[-1]), param_persistence_threshold=0 if strategy == "zero3" else None, **buckets
        )
    probe = PerRankMemory(strategy, persistence, plant, snapshot_steps)
    callbacks: list[pl.Callback] = [probe]
    if method != "full":
        policy: dict[str, Any] = {"lisa": dict(n_layers=2, interval=steps // 2), "badam": dict(interval=steps // 2)}[method]
        if plant == "frozen_state":  # frozen layers keep their Adam moments (not under ZeRO, which refuses it)
            policy["optimizer_state"] = "keep"
        callbacks.append(LayerwiseSampling(method, **policy))
    original = deepspeed.ZeroLayerOptimizer.__init__
    if not size_buckets:
        def unsized(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **{**kwargs, "size_buckets": False})

        deepspeed.ZeroLayerOptimizer.__init__ = unsized
    try:
        fit = pl.Trainer(
            accelerator="cpu", devices=2, strategy=engine_strategy, max_steps=steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, use_distributed_sampler=True,
        )
        module = LlamaLM(hidden, layers)
        fit.fit(module, text_loader(steps * 2))
    finally:
        deepspeed.ZeroLayerOptimizer.__init__ = original
    zero = fit.optimizers[0] if strategy.startswith("zero") else None
    return {
        "strategy": strategy, "method": method, "plant": plant, "size_buckets": size_buckets, "rank": fit.global_rank,
        "bucket_elements": bucket_elements,
        "reduce_bucket_size": getattr(zero, "reduce_bucket_size", None),
        "parameters": sum(numel(p) for p in module.parameters()), "records": probe.records, "rebuilds": probe.rebuilds,
    }


CONFIGS = [
    *[(s, m, None, True) for s in ("ddp", "zero1", "zero2", "zero3", "fsdp2") for m in ("full", "lisa", "badam")],
    ("zero2", "lisa", None, False),
    ("zero3", "lisa", None, False),
    ("zero2", "lisa", "old_optimizer", True),
    ("zero2", "lisa", "loop_variables", True),
    ("fsdp2", "lisa", "frozen_state", True),
]


def table(results: list[dict[str, Any]]) -> str:
    """Rank 0's bytes at the last step's snapshots, against the expectation (in parentheses), in MiB."""
    lines = [
        "| strategy | method | buckets sized | planted | trainable (M) | parameters | optimizer state | gradients after backward |"
        " engine late in backward* | gathered late in backward* | total late in backward* | peak in backward (where) |"
        " total after step | leaving state alive at rebuild | frozen layers' state + gradients |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        at = {x["moment"]: x for x in r["records"]}
        late, backward, step = at.get("in_backward", at["backward"]), at["backward"], at["step"]
        e = step["expected"]
        alive = ", ".join(f"{x['leaving_alive_bytes'] / MIB:.1f} of {x['leaving_bytes'] / MIB:.1f}" for x in r["rebuilds"][1:]) or "-"
        frozen = sum(step["frozen_holding"].values()) + backward["frozen_holding"]["gradients"]
        peak = max((x for x in r["records"] if x["moment"].startswith("in_")), key=lambda x: sum(x["measured"].values()), default=late)
        where = f"layer {peak['layer']}" if peak.get("layer") is not None else peak["moment"].replace("_", " ")
        lines.append(
            f"| {r['strategy']} | {r['method']} | {'yes' if r['size_buckets'] else 'no'} | {r['plant'] or '-'} |"
            f" {step['active'] / 1e6:.2f} | {step['measured']['parameters'] / MIB:.1f} ({e['parameters'] / MIB:.1f}) |"
            f" {step['measured']['optimizer_state'] / MIB:.1f} ({e['optimizer_state'] / MIB:.1f}) |"
            f" {backward['measured']['gradients'] / MIB:.1f} ({backward['expected']['gradients'] / MIB:.1f}) |"
            f" {late['measured']['engine'] / MIB:.1f} | {late['measured'].get('gathered', 0) / MIB:.1f}"
            f" ({late['expected'].get('gathered', 0) / MIB:.1f}) | {sum(late['measured'].values()) / MIB:.1f} |"
            f" {sum(peak['measured'].values()) / MIB:.1f} ({where}) | {sum(step['measured'].values()) / MIB:.1f} | {alive} |"
            f" {frozen / MIB:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="ZeRO-2 LISA only")
    parser.add_argument("--only", nargs="*", default=None, help="strategy:method[:plant][:unsized] configurations to run")
    parser.add_argument("--out", type=Path, default=RESULTS / "per_rank.json")
    parser.add_argument("--bucket-elements", type=int, default=None, help="set the DeepSpeed config's bucket sizes (full training)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    configs = [("zero2", "lisa", None, True)] if args.quick else CONFIGS
    if args.only:
        configs = [c for c in CONFIGS if ":".join([c[0], c[1], *([c[2]] if c[2] else []), *([] if c[3] else ["unsized"])]) in args.only]
    results = [
        measure(s, m, args.steps, plant, sized, hidden=args.hidden, layers=args.layers, snapshot_steps=(args.steps - 1,),
                bucket_elements=args.bucket_elements)
        for s, m, plant, sized in configs
    ]
    if results[0]["rank"] == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(table(results))


if __name__ == "__main__":
    main()
