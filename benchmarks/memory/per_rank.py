"""Per-rank memory on CPU ranks: what each of 2 gloo ranks holds under DDP and ZeRO-1/2/3, measured.

No GPU needed: every live tensor of the process is found (``gc``), de-duplicated by storage and
counted once, in the first of these kinds that claims its storage:

* ``optimizer_state`` - the fp32 master partitions of a ZeRO optimizer and the base optimizer's
  state (Adam's moments);
* ``parameters`` - the module's parameters and buffers (ZeRO-1/2: the flat buffers they are views
  of; ZeRO-3: each rank's partitions ``ds_tensor``);
* ``gradients`` - ``.grad`` of the parameters and of the master partitions, and the reduced
  gradient partitions a ZeRO optimizer holds before its step (ZeRO-1/2 ``averaged_gradients``,
  ZeRO-3 ``grad_partitions_flat_buffer``);
* ``engine`` - any other tensor reachable from the ZeRO optimizer (gradient buckets, ZeRO-3's
  gradient partitions and prefetch state);
* ``other`` - the rest (batches, metrics, ...).

Snapshots per rank: late in backward (when the gradient reaches the embeddings' output: every
other gradient exists and ZeRO's reduce buckets are allocated), after backward
(``on_before_optimizer_step``), after the optimizer step, and around every rebuild of the ZeRO optimizer by ``LayerwiseSampling``
(right before the new optimizer is built: how many bytes of the *leaving* groups' masters and
moments are still alive - the old ZeRO rebuild kept the previous optimizer alive there, and its loop
variables the last group's). DDP's reducer buckets live in C++ and are not seen (4 B per trainable
parameter, not counted); the expectation below leaves them out too.

Analytic expectation per rank (fp32, W ranks, P parameters, A trainable now):

* parameters: 4P (DDP, ZeRO-1/2); 4P/W + parameters ZeRO-3 keeps whole (below the persistence
  threshold) for ZeRO-3;
* optimizer state: 8A (DDP: Adam's two moments) or 12A/W (ZeRO: fp32 master + two moments, sharded);
* gradients after backward: 4A (DDP), 4A/W (ZeRO-2/3 partitions; ZeRO-1 reduces whole gradients).

Run: ``.venv/bin/python -m benchmarks.memory.per_rank`` (about 10 minutes on 2 cores; ``--quick``
for one configuration). The 2 ranks are Lightning's own strategies on CPU, bridged as the tests do
(``tests/support/strategies.py``).
"""

from __future__ import annotations

import argparse
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
from torch.utils.data import DataLoader

os.environ.setdefault("DS_ACCELERATOR", "cpu")

MIB = 2**20
KINDS = ("parameters", "gradients", "optimizer_state", "engine", "other")
RESULTS = Path(__file__).parent / "results"


def _key(t: torch.Tensor) -> tuple[int, str] | None:
    if t.device.type == "meta" or t.is_sparse:
        return None
    storage = t.untyped_storage()
    return (storage.data_ptr(), str(t.device)) if storage.nbytes() else None


def _reachable_tensors(root: Any, depth: int = 6) -> Iterator[torch.Tensor]:
    """Tensors reachable from ``root`` through attributes, lists, tuples and dicts (not into modules)."""
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
            elif hasattr(obj, "__dict__") and not isinstance(obj, type):
                found += list(vars(obj).values())
        frontier = found


def zero_optimizers_alive() -> int:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return sum(isinstance(o, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)) for o in gc.get_objects())


def breakdown(module: nn.Module, optimizer: Any, largest: dict[str, list] | None = None) -> dict[str, int]:
    """Bytes of every live tensor storage of this process, by kind (see the module doc). ``largest``,
    if given, receives the shapes and bytes of the 3 largest storages of each kind."""
    from weightwise.integrations import deepspeed

    gc.collect()
    zero = optimizer if type(optimizer).__name__.startswith("DeepSpeedZeroOptimizer") else None
    basic = zero.optimizer if zero is not None else optimizer
    masters = deepspeed.master_partitions(zero) if zero is not None else []
    claims: dict[tuple[int, str], str] = {}

    def claim(kind: str, tensors: Iterable[torch.Tensor | None]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and (key := _key(t)) is not None:
                claims.setdefault(key, kind)

    params = list(module.parameters())
    claim("optimizer_state", masters)
    claim("optimizer_state", (v for state in basic.state.values() for v in state.values()))
    claim("parameters", params + list(module.buffers()) + [getattr(p, "ds_tensor", None) for p in params])
    claim("gradients", [p.grad for p in params] + [m.grad for m in masters])
    if zero is not None:  # the reduced gradient partitions before the step: ZeRO-1/2, ZeRO-3
        claim("gradients", _reachable_tensors(getattr(zero, "averaged_gradients", None), depth=3))
        claim("gradients", [getattr(zero, "grad_partitions_flat_buffer", None)])
    if zero is not None:
        claim("engine", _reachable_tensors(zero))
    totals = dict.fromkeys(KINDS, 0)
    counted: set[tuple[int, str]] = set()
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and (key := _key(obj)) is not None and key not in counted:
            counted.add(key)
            kind, nbytes = claims.get(key, "other"), obj.untyped_storage().nbytes()
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


def expected(module: nn.Module, strategy: str, world: int, persistence_threshold: int = 0) -> dict[str, float]:
    """The analytic per-rank bytes (module doc) for the parameters trainable now."""
    total = sum(numel(p) for p in module.parameters())
    active = sum(numel(p) for p in module.parameters() if p.requires_grad)
    whole = sum(numel(p) for p in module.parameters() if numel(p) < persistence_threshold)
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    if strategy == "ddp":
        return {"parameters": 4 * total + buffers, "optimizer_state": 8 * active, "gradients": 4 * active}
    params = 4 * (total - whole) / world + 4 * whole if strategy == "zero3" else 4 * total
    return {"parameters": params + buffers, "optimizer_state": 12 * active / world, "gradients": 4 * active / world}


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

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, moment: str, step: int) -> None:
        largest: dict[str, list] = {}
        measured = breakdown(pl_module, trainer.optimizers[0], largest)
        analytic = expected(pl_module, self.strategy, trainer.world_size, self.persistence_threshold)
        active = sum(numel(p) for p in pl_module.parameters() if p.requires_grad)
        self.records.append({"step": step, "moment": moment, "active": active, "measured": measured, "expected": analytic, "largest": largest})

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
        # produced and ZeRO's reduce buckets are allocated - the late-backward peak.
        if not self._wanted(trainer.global_step):
            return
        embedding = next(m for m in pl_module.modules() if isinstance(m, nn.Embedding))

        def on_output(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            handle.remove()
            if output.requires_grad:  # not with frozen embeddings (BAdam): no late-backward snapshot then
                    output.register_hook(lambda grad: self._record(trainer, pl_module, "in_backward", trainer.global_step))

        handle = embedding.register_forward_hook(on_output)

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

    from tests.support.strategies import CPUDeepSpeedStrategy
    from weightwise.callbacks import LayerwiseSampling
    from weightwise.integrations import deepspeed

    seed_everything(0)
    persistence = 0
    if strategy == "ddp":
        engine_strategy: Any = "ddp"
    else:
        # Full training gets no rebuild: "sized" buckets are then set by hand to one layer's parameter count.
        buckets = {"reduce_bucket_size": bucket_elements, "allgather_bucket_size": bucket_elements} if bucket_elements else {}
        engine_strategy = CPUDeepSpeedStrategy(
            stage=int(strategy[-1]), param_persistence_threshold=0 if strategy == "zero3" else None, **buckets
        )
    probe = PerRankMemory(strategy, persistence, plant, snapshot_steps)
    callbacks: list[pl.Callback] = [probe]
    if method != "full":
        policy = {"lisa": dict(n_layers=2, interval=steps // 2), "badam": dict(interval=steps // 2)}[method]
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
    zero = fit.optimizers[0] if strategy != "ddp" else None
    return {
        "strategy": strategy, "method": method, "plant": plant, "size_buckets": size_buckets, "rank": fit.global_rank,
        "bucket_elements": bucket_elements,
        "reduce_bucket_size": getattr(zero, "reduce_bucket_size", None),
        "parameters": sum(numel(p) for p in module.parameters()), "records": probe.records, "rebuilds": probe.rebuilds,
    }


CONFIGS = [
    *[(s, m, None, True) for s in ("ddp", "zero1", "zero2", "zero3") for m in ("full", "lisa", "badam")],
    ("zero2", "lisa", None, False),
    ("zero3", "lisa", None, False),
    ("zero2", "lisa", "old_optimizer", True),
    ("zero2", "lisa", "loop_variables", True),
]


def table(results: list[dict[str, Any]]) -> str:
    """Rank 0's bytes at the last step's snapshots, against the expectation (in parentheses), in MiB."""
    lines = [
        "| strategy | method | buckets sized | planted | trainable (M) | parameters | optimizer state | gradients after backward |"
        " engine late in backward* | total late in backward* | total after step | leaving state alive at rebuild |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        at = {x["moment"]: x for x in r["records"]}
        late, backward, step = at.get("in_backward", at["backward"])["measured"], at["backward"], at["step"]
        e = step["expected"]
        alive = ", ".join(f"{x['leaving_alive_bytes'] / MIB:.1f} of {x['leaving_bytes'] / MIB:.1f}" for x in r["rebuilds"][1:]) or "-"
        lines.append(
            f"| {r['strategy']} | {r['method']} | {'yes' if r['size_buckets'] else 'no'} | {r['plant'] or '-'} |"
            f" {step['active'] / 1e6:.2f} | {step['measured']['parameters'] / MIB:.1f} ({e['parameters'] / MIB:.1f}) |"
            f" {step['measured']['optimizer_state'] / MIB:.1f} ({e['optimizer_state'] / MIB:.1f}) |"
            f" {backward['measured']['gradients'] / MIB:.1f} ({e['gradients'] / MIB:.1f}) | {late['engine'] / MIB:.1f} |"
            f" {sum(late.values()) / MIB:.1f} | {sum(step['measured'].values()) / MIB:.1f} | {alive} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="ZeRO-2 LISA only")
    parser.add_argument("--only", nargs="*", default=None, help="strategy:method[:plant][:unsized] configurations to run")
    parser.add_argument("--out", type=Path, default=RESULTS / "per_rank.json")
    parser.add_argument("--bucket-elements", type=int, default=None, help="set the DeepSpeed config's bucket sizes (full training)")
    args = parser.parse_args()
    configs = [("zero2", "lisa", None, True)] if args.quick else CONFIGS
    if args.only:
        configs = [c for c in CONFIGS if ":".join([c[0], c[1], *([c[2]] if c[2] else []), *([] if c[3] else ["unsized"])]) in args.only]
    results = [
        measure(s, m, args.steps, plant, sized, snapshot_steps=(args.steps - 1,), bucket_elements=args.bucket_elements)
        for s, m, plant, sized in configs
    ]
    if results[0]["rank"] == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(table(results))


if __name__ == "__main__":
    main()
