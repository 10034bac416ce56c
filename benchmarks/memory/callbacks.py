"""Peak memory of weightwise's other callbacks: the per-sample loss path at 7B and expert upcycling.

What is measured, and how (every number is measured unless its table says "analytic"):

1. **The per-sample loss path in a 7B training step** (Llama-2-7B shape, batch 4 x 512, fp32
   parameters, bf16 autocast, foreach AdamW, three steps as :mod:`benchmarks.memory.simulate`): the
   simulator's fake tensors and memory tracker (:mod:`benchmarks.memory.tracking`) run full
   fine-tuning, LoRA and the headline LISA recipe with three losses - HF's own ``labels=`` loss
   (``F.cross_entropy`` on the ``[B, T, V]`` logits upcast to fp32), weightwise's per-sequence loss
   from the logits (:func:`weightwise.losses.sequence_loss`: chunked
   :func:`~weightwise.losses.token_cross_entropy`) and from the last hidden states
   (:func:`~weightwise.losses.linear_cross_entropy`), each reweighted (``loss_weights`` "linupper",
   ``weighted_mean``) as :func:`benchmarks.memory.methods.weightwise_loss` does.
2. **The loss head alone** at the same shapes - the hidden states ``[4, 512, 4096]`` to the scalar
   loss and back, fake tensors; the logits, their fp32 copy and the cross-entropy's buffers - and at
   a 128k vocabulary (Llama-3-8B's head: hidden 4096, vocabulary 128256, batch 4 x 2048, the case
   :mod:`weightwise.weighting.losses` cites: a ``[B, T, V]`` fp32 copy of 4 GiB).
3. **The reducer's step** (:class:`weightwise.weighting.reducer.PerSampleLossReducer` with
   ``LossReweighting``, its all-gather, weights, score-store update and the backward through the
   weighted mean), on *real* tensors - the reducer reads values in Python (``float(losses.sum())``,
   ``torch.aminmax`` of the ids, the boolean mask of token losses), which fake tensors cannot - in
   one process and on 8 gloo processes (world 8, each rank's batch 4), against a plain ``mean()``.
   Bytes are exact (``MemTracker`` on real CPU tensors); the CUDA caching allocator's 512-byte
   blocks are applied to each live storage as well.
4. **The score store** (:class:`weightwise.SampleScoreStore`): bytes per sample of each field set,
   and what its amortised doubling holds after the ids of a shuffled or in-order epoch (real tensors).
5. **Expert upcycling 8 -> 16 experts** of an OLMoE-1B-7B-shaped model (hidden 2048, 16 layers,
   1024 hidden units per expert, 16 heads, vocabulary 50304; 8 experts, top-2, OLMoE's
   ``norm_topk_prob=False``), fp32 parameters and foreach AdamW state after a step (gradients of
   zeros: a step's memory does not depend on their values), with the step's gradients still
   allocated (as when ``ExpertUpcycling`` runs, at ``on_train_batch_start``) or freed:
   ``weightwise.experts.upcycle_experts(model, 2, optimizer=...)`` runs on the ``meta`` device at
   full size (it cannot run under ``FakeTensorMode``: ``torch.arange(e).repeat_interleave(copies)``
   has a data-dependent shape), tracked by torch's ``MemTracker``; the same code on real CPU tensors
   with 1 and 2 layers validates the meta numbers and gives the per-layer extrapolation to 16.
   OLMoE's forward pass (data-dependent routing) runs on neither, so activations are not included.

Run from the repository root (about 7 minutes on 2 shared cores; the real 2-layer upcycling run
needs ~9 GB of host memory)::

    python -m benchmarks.memory.callbacks                       # everything
    python -m benchmarks.memory.callbacks --parts upcycle,store --out /tmp/mem

Writes ``callbacks.md`` and ``callbacks.json`` to ``--out`` (default ``benchmarks/memory/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed._tools.mem_tracker import MemTracker

from weightwise import SampleScoreStore
from weightwise.callbacks import LossReweighting
from weightwise.experts import upcycle_experts
from weightwise.losses import linear_cross_entropy, loss_weights, sequence_loss, weighted_mean
from weightwise.weighting.reducer import PerSampleLossReducer

GIB, MIB = 2**30, 2**20
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PARTS = ("loss", "head", "reducer", "store", "upcycle")
MACHINE = "2-core x86_64 VM, torch 2.13 CPU"
CUDA_BLOCK = 512  # the CUDA caching allocator's smallest block (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize)

# ---------------------------------------------------------------------------------------------- 1, 2: loss path
LOSS_MODEL = "7b"
LOSS_RECIPES = ("full", "lora", "lisa_layers+bf16frozen+ckpt+fused")
LOSSES = {
    "plain": "HF `model(input_ids, labels=input_ids).loss`: F.cross_entropy on the [B, T, V] logits upcast to fp32, mean",
    "weightwise": "weightwise.losses.sequence_loss (chunked token_cross_entropy) -> loss_weights(linupper) -> weighted_mean",
    "weightwise_linear": "weightwise.losses.linear_cross_entropy from the last hidden states -> per-sequence mean"
    " -> loss_weights(linupper) -> weighted_mean (no [B, T, V] logits)",
}

HEAD_LOSSES = {
    **LOSSES,
    "weightwise_labels_shifted": "as `weightwise`, but `sequence_loss(logits, F.pad(ids[:, 1:], (0, 1), value=-100))`"
    " (the labels shifted by hand, as HF's loss does) instead of `shift=True`: a check that `shift=True` costs the"
    " same (it shifts the labels too; earlier versions sliced the logits `[:, :-1]`, so that `reshape(-1, V)` copied"
    " them: +1 bf16 `[B, T-1, V]` at the forward peak)",
}
HEAD_SHAPES = {
    "7b": "Llama-2-7B's head, as in part 1: hidden 4096, vocabulary 32000, batch 4 x 512",
    "128k": "Llama-3-8B's head: hidden 4096, vocabulary 128256, batch 4 x 2048",
}


def _loss(name: str) -> Callable[[nn.Module, Tensor, Any], Tensor]:
    from benchmarks.memory.methods import weightwise_loss

    if name == "plain":
        return lambda model, ids, accelerator: model(input_ids=ids, labels=ids).loss
    return lambda model, ids, accelerator: weightwise_loss(model, ids, accelerator, from_hidden=name == "weightwise_linear")


def loss_path(recipe_name: str, loss: str) -> dict[str, Any]:
    """One simulated 7B run of ``recipe_name`` (see :mod:`benchmarks.memory.methods`) with the given loss:
    the peak of each phase in bytes, by kind. The loop is :func:`benchmarks.memory.simulate.simulate`'s."""
    # Imported here: transformers and peft are heavy, and the gloo workers of part 3 import this module.
    from benchmarks.memory.methods import Recipe, prepare
    from benchmarks.memory.models import SHAPES
    from benchmarks.memory.simulate import STEPS
    from benchmarks.memory.tracking import FakeAccelerator, tracking

    start = time.perf_counter()
    shape, compute = SHAPES[LOSS_MODEL], _loss(loss)
    with FakeAccelerator() as accelerator:
        run = prepare(Recipe.parse(recipe_name), shape, accelerator)
        run.before_step(0)
        with tracking(run.model, run.optimizer) as tracker:
            for step in range(STEPS):
                tracker.step = f"step {step + 1}"
                if step > 0:
                    tracker.stage = "layer switch"
                    run.before_step(step)
                    tracker.track_external(run.model)
                tracker.stage = "forward/backward"
                ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq))
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    value = compute(run.model, ids, accelerator)
                value.backward()
                tracker.stage = "optimizer"
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
    peaks = tracker.phase_peaks
    totals = {phase: sum(kinds.values()) for phase, kinds in peaks.items()}
    peak_phase = max(reversed(list(totals)), key=totals.get)
    fwd_phase = max((p for p in totals if p.endswith("forward/backward")), key=totals.get)
    return {
        "recipe": recipe_name,
        "loss": loss,
        "peak": totals[peak_phase],
        "peak_phase": peak_phase,
        "forward_backward_peak": totals[fwd_phase],
        "forward_backward_kinds": peaks[fwd_phase],
        "seconds": time.perf_counter() - start,
    }


def _head_dims(shape_name: str) -> tuple[int, int, int, int]:
    """``(B, T, H, V)`` of a :data:`HEAD_SHAPES` entry."""
    if shape_name == "128k":
        return 4, 2048, 4096, 128256
    from benchmarks.memory.models import SHAPES

    shape = SHAPES[LOSS_MODEL]
    return shape.batch, shape.seq, shape.hidden_size, shape.vocab_size


def loss_head(loss: str, trainable_head: bool, shape_name: str = "7b") -> dict[str, Any]:
    """The loss head alone at one of :data:`HEAD_SHAPES`: fp32 last hidden states ``[B, T, H]``
    (requiring grad, as in the model) and the fp32 output embedding ``[V, H]``, to the scalar loss and
    back, under bf16 autocast on fake tensors. Bytes above the inputs: held after the forward pass, and
    the peak."""
    from benchmarks.memory.tracking import FakeAccelerator

    b, t, h, v = _head_dims(shape_name)
    with FakeAccelerator() as accelerator:
        hidden = torch.empty(b, t, h, requires_grad=True)
        weight = nn.Parameter(torch.empty(v, h), requires_grad=trainable_head)
        ids = torch.randint(0, v, (b, t))
        tracker = BlockTracker()
        tracker.track_external(hidden, weight, ids)
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
            if loss == "plain":  # LlamaForCausalLM's head, then transformers.loss.loss_utils.ForCausalLMLoss, inlined
                logits = F.linear(hidden, weight)  # bf16, alive until the loss is computed (the model's output)
                labels = F.pad(ids, (0, 1), value=-100)[..., 1:]
                value = F.cross_entropy(logits.float().view(-1, v), labels.reshape(-1), ignore_index=-100)
                del logits
            else:
                if loss == "weightwise":
                    losses = sequence_loss(F.linear(hidden, weight), ids, shift=True)
                elif loss == "weightwise_labels_shifted":  # the same losses; the labels move, not the logits
                    losses = sequence_loss(F.linear(hidden, weight), F.pad(ids[:, 1:], (0, 1), value=-100))
                else:
                    token_losses, mask = linear_cross_entropy(hidden, weight, ids, shift=True)
                    valid = mask.to(token_losses.dtype)
                    losses = (token_losses * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)
                weights = accelerator.from_real(lambda: loss_weights(torch.linspace(1.0, 3.0, b), "linupper"))
                value = weighted_mean(losses, weights)
            held, forward_peak = tracker.live()["bytes"], tracker.peak["bytes"]
            value.backward()
    grads = hidden.numel() * 4 + (weight.numel() * 4 if trainable_head else 0)
    return {
        "shape": shape_name,
        "loss": loss,
        "trainable_head": trainable_head,
        "forward_peak": forward_peak,
        "held_after_forward": held,
        "peak": tracker.peak["bytes"],
        "input_grads": grads,
    }


# ---------------------------------------------------------------------------------------------- 3: reducer
REDUCER_BATCH = 4  # per rank, as the 7B runs
REDUCER_WORLD = 8
REDUCER_TOKENS = 512
REDUCER_CASES = {
    "losses": "[B] losses, no sample ids (LossReweighting alone needs none): 1 gathered column",
    "losses+ids+store": "[B] losses with sample ids, all 5 score-store fields kept: 2 columns, store update",
    "tokens+ids+store": "{'loss': [B, T] token losses, 'mask'} with sample ids, all 5 store fields: reduce_token_losses,"
    " 4 columns (losses, ids, token counts, ranks)",
}


class BlockTracker(MemTracker):
    """``MemTracker`` that keeps the peak of the storages created while it is entered, counted three
    ways: bytes, bytes as the CUDA caching allocator hands them out (whole 512-byte blocks), and
    blocks. Storages given to :meth:`track_external` before entering (the inputs) are not counted.

    Per-storage sizes come from ``MemTracker``'s private ``_WINFO`` table (torch 2.13)."""

    def __init__(self) -> None:
        super().__init__()
        self._baseline: dict[str, int] = {"bytes": 0, "cuda_bytes": 0, "blocks": 0}
        self.peak: dict[str, int] = dict(self._baseline)

    def _all(self) -> dict[str, int]:
        sizes = [winfo.size * winfo.element_size for winfo, _ in self._WINFO.values()]
        sizes = [s for s in sizes if s > 0]
        return {"bytes": sum(sizes), "cuda_bytes": sum(-(-s // CUDA_BLOCK) * CUDA_BLOCK for s in sizes), "blocks": len(sizes)}

    def live(self) -> dict[str, int]:
        """Bytes, CUDA-rounded bytes and blocks created since entering and alive now."""
        return {k: v - self._baseline[k] for k, v in self._all().items()}

    def __enter__(self) -> BlockTracker:
        if self._depth == 0:
            self._baseline = self._all()
        super().__enter__()
        return self

    def _update_peak_stats(self, peak_state: Any) -> None:
        super()._update_peak_stats(peak_state)
        for key, value in self.live().items():
            self.peak[key] = max(self.peak[key], value)


def _stub_trainer() -> SimpleNamespace:
    """What the reducer reads of a Lightning trainer outside logging steps (logging adds four scalars)."""
    return SimpleNamespace(global_step=10, _logger_connector=SimpleNamespace(should_update_logs=False))


def _step_output(case: str, rank: int, generator: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
    """A rank's ``training_step`` output (real tensors standing in for the model's) and the leaf the
    backward pass ends at (the per-sample or per-token losses)."""
    b = REDUCER_BATCH
    ids = torch.arange(rank * b, (rank + 1) * b)
    if case.startswith("tokens"):
        leaf = (torch.rand(b, REDUCER_TOKENS - 1, generator=generator) + 1.0).requires_grad_()
        mask = torch.ones(b, REDUCER_TOKENS - 1, dtype=torch.bool)
        mask[:, -(rank + 7) :] = False  # padding: sequences of different lengths
        return {"loss": leaf, "mask": mask, "sample_ids": ids}, leaf
    leaf = (torch.rand(b, generator=generator) + 1.0).requires_grad_()
    output = {"loss": leaf} if case == "losses" else {"loss": leaf, "sample_ids": ids}
    return output, leaf


def reducer_step(case: str, rank: int = 0) -> dict[str, Any]:
    """Bytes the reducer allocates in one step (forward and the backward through the weighted mean)
    above its inputs, against a plain mean of the same losses; real tensors, this process' world."""
    generator = torch.Generator().manual_seed(rank)
    fields = () if case == "losses" else ("loss", "ema", "weight", "count", "last_step")
    callback = LossReweighting("linupper", warmup_steps=0, store_fields=fields)
    reducer = PerSampleLossReducer(_stub_trainer(), None, [callback], "raise", callback.sample_id_key, "rank", bool(fields))
    reducer.scores.require(*fields)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    reducer.scores.update(torch.arange(REDUCER_BATCH * world), torch.ones(REDUCER_BATCH * world), step=0)  # grown once
    out: dict[str, Any] = {"case": case, "world": world, "rank": rank}
    for name in ("plain", "reducer"):
        output, leaf = _step_output(case, rank, generator)
        tracker = BlockTracker()
        tracker.track_external(*output.values())
        with tracker:
            if name == "reducer":
                value = reducer.reduce(output, batch=None)["loss"]
            elif leaf.ndim == 2:  # plain token mean
                mask = output["mask"].to(leaf.dtype)
                value = (leaf * mask).sum() / mask.sum()
            else:
                value = leaf.mean()
            value.backward()
        out[name] = tracker.peak
    out["store_bytes"] = sum(getattr(reducer.scores, name).untyped_storage().nbytes() for name in fields)
    return out


def _reducer_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = [reducer_step(case, rank) for case in REDUCER_CASES]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def reducer_world(world: int) -> list[dict[str, Any]]:
    """:func:`reducer_step` of every case on ``world`` gloo processes; each rank's result."""
    if world == 1:
        return [reducer_step(case) for case in REDUCER_CASES]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_reducer_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world)
        return [r for rank in range(world) for r in json.loads(Path(tmp, f"rank{rank}.json").read_text())]


def gather_analytic(columns: dict[str, int], batch: int, world: int) -> dict[str, int]:
    """What ``weightwise.core.collectives.all_gather_variable`` allocates for 1-D columns of ``batch``
    entries per rank (element sizes in bytes) on ``world`` ranks: the lengths exchange (``1 + world``
    int64), and per column the padded copy, ``world`` receive buffers and the concatenated result."""
    payload = sum(size * batch * world for size in columns.values())  # the gathered columns, kept
    allocated = 8 * (1 + world) + sum(size * batch * (2 * world + 1) for size in columns.values())
    blocks = 1 + world + len(columns) * (world + 2)
    return {"gathered": payload, "allocated": allocated, "blocks": blocks, "cuda_bytes_upper": blocks * CUDA_BLOCK}


# ---------------------------------------------------------------------------------------------- 4: score store
STORE_FIELD_SETS = {
    "LossReweighting alone (no ids needed)": (),
    "DataPruning(InfoBatch): latest loss": ("loss",),
    "SampleReport: weight, ema, count": ("weight", "ema", "count"),
    "all five built-in fields": ("loss", "ema", "weight", "count", "last_step"),
}
STORE_SAMPLES = 1_000_000
STORE_GLOBAL_BATCH = REDUCER_BATCH * REDUCER_WORLD


def store_fields() -> list[dict[str, Any]]:
    """Bytes per sample of each field set, read from a real store after one update (+4 per recorded signal)."""
    rows = []
    for label, fields in STORE_FIELD_SETS.items():
        store = SampleScoreStore(fields=fields)
        store.update(torch.arange(8), torch.rand(8), step=0, weights=torch.ones(8))
        rows.append({"callbacks": label, "fields": list(fields), "bytes_per_sample": store.bytes_per_sample})
    return rows


def store_growth(order: str, num_samples: int = STORE_SAMPLES) -> dict[str, Any]:
    """The reducer's store (created empty, growing by doubling to the largest id seen) fed the global
    batches of one epoch in ``order`` ("shuffled" or "in order"), all five fields, real tensors:
    the capacity it ends with, and the peak of its bytes (growth copies old and new side by side)."""
    fields = STORE_FIELD_SETS["all five built-in fields"]
    ids = (
        torch.randperm(num_samples, generator=torch.Generator().manual_seed(0))
        if order == "shuffled"
        else torch.arange(num_samples)
    )
    store = SampleScoreStore(fields=())  # as PerSampleLossReducer creates it, then the callbacks' require()
    store.require(*fields)
    batches = ids.split(STORE_GLOBAL_BATCH)
    tracker = BlockTracker()
    tracker.track_external(ids)
    with tracker:
        for step, batch in enumerate(batches):
            store.update(batch, torch.rand(batch.numel()), step=step, weights=torch.ones(batch.numel()))
            if len(store) == num_samples:  # every later id is below it: no more growth
                break
        final = tracker.live()["bytes"]
    capacity = store.last_step.untyped_storage().nbytes() // store.last_step.element_size()  # the allocated length
    return {
        "order": order,
        "num_samples": num_samples,
        "steps_until_full_size": step + 1,
        "capacity": capacity,
        "capacity_ratio": capacity / num_samples,
        "bytes": final,
        "bytes_needed": num_samples * store.bytes_per_sample,
        "peak_bytes": tracker.peak["bytes"],
    }


# ---------------------------------------------------------------------------------------------- 5: upcycling
OLMOE_LAYERS = 16
OLMOE_SHAPE = {  # OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924) but 8 experts, top-2
    "hidden_size": 2048,
    "intermediate_size": 1024,  # per expert
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 50304,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": False,  # OLMoE's: the copies' outputs are scaled by 2 (preserve_function=True)
    "tie_word_embeddings": False,
}
UPCYCLE_FACTOR = 2
UPCYCLE_CASES = {  # (method, optimizer_state, gradients alive during the surgery)
    "duplicate, state copied, grads alive": ("duplicate", "copy", True),
    "duplicate, state copied, grads freed": ("duplicate", "copy", False),
    "granular, state copied, grads alive": ("granular", "copy", True),
    "duplicate, state reset, grads alive": ("duplicate", "reset", True),
}
MAIN_CASE = "duplicate, state copied, grads alive"
VALIDATION_LAYERS = (1, 2)


def olmoe(layers: int, device: str) -> nn.Module:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    with torch.device(device):
        model = OlmoeForCausalLM(OlmoeConfig(num_hidden_layers=layers, **OLMOE_SHAPE))
    return model.train()


@dataclass
class Upcycling:
    """One measured surgery, bytes on the model's device (``MemTracker``)."""

    case: str
    layers: int
    device: str
    parameters: tuple[int, int]  # before, after
    step_before: int  # peak of a foreach AdamW step before the surgery (params, grads, state, temporaries)
    before: int  # live when the surgery starts
    peak: int  # the surgery's peak
    peak_kinds: dict[str, int]  # at that peak: old tensors by kind, and "new" (everything the surgery allocated)
    after: int  # live when it returns
    step_after: int  # peak of the next optimizer step
    seconds: float

    @property
    def transient(self) -> int:
        return self.peak - max(self.before, self.after)


def _tracked(model: nn.Module, optimizer: torch.optim.Optimizer) -> MemTracker:
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    return tracker


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """A training step's optimizer phase: gradients for every parameter (zeros - the memory does not
    depend on their values), then AdamW's update; its peak bytes."""
    device = next(model.parameters()).device
    tracker = _tracked(model, optimizer)
    with tracker:
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        optimizer.step()
    return tracker.get_tracker_snapshot("peak")[device]["Total"]


def upcycle(case: str, layers: int = OLMOE_LAYERS, device: str = "meta") -> Upcycling:
    """Upcycle the OLMoE-shaped model 8 -> 16 experts after an AdamW step, as ``ExpertUpcycling`` does
    at ``on_train_batch_start`` (the previous step's gradients are still allocated then: Lightning
    zeroes them after the next ``training_step``) or with the gradients freed first."""
    method, state, grads_alive = UPCYCLE_CASES[case]
    start = time.perf_counter()
    model = olmoe(layers, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    before_params = sum(p.numel() for p in model.parameters())
    step_before = _optimizer_step(model, optimizer)
    if not grads_alive:
        optimizer.zero_grad(set_to_none=True)
    tracker = _tracked(model, optimizer)
    dev = torch.device(device)
    before = tracker.get_tracker_snapshot()[dev]["Total"]
    with tracker:
        upcycle_experts(model, UPCYCLE_FACTOR, method=method, optimizer=optimizer, optimizer_state=state)
    peak = tracker.get_tracker_snapshot("peak")[dev]
    after = tracker.get_tracker_snapshot()[dev]["Total"]
    kinds = {str(getattr(k, "value", k)): v for k, v in peak.items() if k != "Total" and v}
    kinds["new"] = kinds.pop("Activation", 0)  # MemTracker files what an op outside forward/backward makes as activations
    after_params = sum(p.numel() for p in model.parameters())
    step_after = _optimizer_step(model, optimizer)
    return Upcycling(
        case,
        layers,
        device,
        (before_params, after_params),
        step_before,
        before,
        peak["Total"],
        kinds,
        after,
        step_after,
        time.perf_counter() - start,
    )


def fake_tensor_attempt() -> str:
    """Run the surgery under ``FakeTensorMode`` (one layer) and return the error and the weightwise
    line that raised it, or "runs"."""
    from benchmarks.memory.tracking import FakeAccelerator

    with FakeAccelerator() as accelerator:
        with torch.device("meta"):
            model = olmoe(1, "meta")
        model = accelerator.materialize(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        try:
            upcycle_experts(model, UPCYCLE_FACTOR, optimizer=optimizer)
        except Exception as error:  # report any failure, whatever its type
            ours = [f for f in traceback.extract_tb(error.__traceback__) if f"{os.sep}weightwise{os.sep}" in f.filename]
            where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno} `{ours[-1].line}`" if ours else ""
            return f"fails: {type(error).__name__}{where}"
    return "runs"


def expert_tensor_bytes() -> dict[str, int]:
    """Analytic: one layer's fused expert tensors at 8 experts (fp32)."""
    h, i, e = OLMOE_SHAPE["hidden_size"], OLMOE_SHAPE["intermediate_size"], OLMOE_SHAPE["num_experts"]
    return {"gate_up_proj": e * 2 * i * h * 4, "down_proj": e * h * i * 4}


# ---------------------------------------------------------------------------------------------- report
def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def _table(head: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(head) - 1)
    marks = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def loss_section(runs: list[dict[str, Any]]) -> str:
    plain = {r["recipe"]: r for r in runs if r["loss"] == "plain"}
    rows = []
    for r in runs:
        base = plain.get(r["recipe"])
        delta_fb = (
            "-" if base is None or r is base else f"{(r['forward_backward_peak'] - base['forward_backward_peak']) / GIB:+.2f}"
        )
        delta = "-" if base is None or r is base else f"{(r['peak'] - base['peak']) / GIB:+.2f}"
        k = r["forward_backward_kinds"]
        rows.append(
            [
                r["recipe"],
                r["loss"],
                gib(k["activations"]),
                gib(k["backward_temporaries"]),
                gib(r["forward_backward_peak"]),
                delta_fb,
                f"**{gib(r['peak'])}**",
                delta,
                r["peak_phase"],
            ]
        )
    head = [
        "recipe (7B)",
        "loss",
        "act GiB",
        "bw temp GiB",
        "fwd/bwd peak GiB",
        "Δ fwd/bwd vs plain",
        "run peak GiB",
        "Δ peak vs plain",
        "peak phase",
    ]
    legend = "\n".join(f"- `{name}`: {text}" for name, text in LOSSES.items())
    return f"{legend}\n\n{_table(head, rows, 'll' + 'r' * 6 + 'l')}"


def head_section(rows: list[dict[str, Any]]) -> str:
    body = [
        [
            r.get("shape", "7b"),
            r["loss"],
            "trainable" if r["trainable_head"] else "frozen",
            mib(r["forward_peak"]),
            mib(r["held_after_forward"]),
            mib(r["peak"]),
            mib(r["input_grads"]),
        ]
        for r in rows
    ]
    legend = "\n".join(
        [f"- shape `{name}`: {text}" for name, text in HEAD_SHAPES.items()]
        + [f"- `{name}`: {text}" for name, text in HEAD_LOSSES.items() if name not in LOSSES]
    )
    head = [
        "shape",
        "loss",
        "lm_head",
        "forward peak MiB",
        "held after forward MiB",
        "peak MiB (fwd+bwd)",
        "of which input grads MiB",
    ]
    return f"{legend}\n\n{_table(head, body, 'lllrrrr')}"


def reducer_section(results: dict[str, list[dict[str, Any]]]) -> str:
    rows = []
    for world, runs in results.items():
        for case in REDUCER_CASES:
            mine = [r for r in runs if r["case"] == case]
            worst = max(mine, key=lambda r: r["reducer"]["cuda_bytes"])
            p, w = worst["plain"], worst["reducer"]
            rows.append(
                [
                    world,
                    case,
                    f"{p['bytes']:,}",
                    f"{w['bytes']:,}",
                    f"{w['bytes'] - p['bytes']:+,}",
                    f"{p['cuda_bytes']:,}",
                    f"{w['cuda_bytes']:,}",
                    f"{w['cuda_bytes'] - p['cuda_bytes']:+,}",
                    w["blocks"],
                ]
            )
    head = [
        "world",
        "case",
        "plain B",
        "reducer B",
        "Δ B",
        "plain B (512-B blocks)",
        "reducer B (512-B blocks)",
        "Δ (blocks)",
        "reducer blocks",
    ]
    legend = "\n".join(f"- `{name}`: {text}" for name, text in REDUCER_CASES.items())
    analytic = []
    for label, columns in (
        ("losses (fp32)", {"losses": 4}),
        ("losses + ids (int64)", {"losses": 4, "ids": 8}),
        ("losses, ids, tokens, ranks", {"losses": 4, "ids": 8, "tokens": 4, "ranks": 4}),
    ):
        a = gather_analytic(columns, REDUCER_BATCH, REDUCER_WORLD)
        analytic.append([label, f"{a['gathered']:,}", f"{a['allocated']:,}", a["blocks"], f"{a['cuda_bytes_upper']:,}"])
    table = _table(
        ["columns gathered", "gathered B = B×world×dtype", "allocated B", "blocks", "≤ B in 512-B blocks"], analytic, "lrrrr"
    )
    return (
        f"{legend}\n\n{_table(head, rows, 'll' + 'r' * 7)}\n\n"
        f"Analytic, `all_gather_variable` at batch {REDUCER_BATCH} per rank, world {REDUCER_WORLD}:\n\n{table}"
    )


def store_section(fields: list[dict[str, Any]], growth: list[dict[str, Any]]) -> str:
    a = _table(
        ["callbacks", "fields", "bytes/sample", "at 1M samples", "at 100M samples"],
        [
            [
                r["callbacks"],
                ", ".join(r["fields"]) or "-",
                r["bytes_per_sample"],
                f"{mib(r['bytes_per_sample'] * 1e6)} MiB",
                f"{gib(r['bytes_per_sample'] * 1e8)} GiB",
            ]
            for r in fields
        ],
        "llrrr",
    )
    b = _table(
        ["id order", "samples", "steps to full size", "capacity", "capacity / samples", "MiB held", "MiB needed", "peak MiB"],
        [
            [
                g["order"],
                f"{g['num_samples']:,}",
                g["steps_until_full_size"],
                f"{g['capacity']:,}",
                f"{g['capacity_ratio']:.2f}",
                mib(g["bytes"]),
                mib(g["bytes_needed"]),
                mib(g["peak_bytes"]),
            ]
            for g in growth
        ],
        "lrrrrrrr",
    )
    return f"{a}\n\n{b}"


def upcycle_section(runs: list[Upcycling], fake: str) -> str:
    rows = []
    for u in runs:
        rows.append(
            [
                u.case,
                u.device,
                u.layers,
                f"{u.parameters[0] / 1e9:.2f} -> {u.parameters[1] / 1e9:.2f}",
                gib(u.step_before),
                gib(u.before),
                f"**{gib(u.peak)}**",
                gib(u.after),
                f"{mib(u.transient)}",
                f"{u.transient / u.after:.1%}",
                gib(u.step_after),
            ]
        )
    head = [
        "case",
        "device",
        "layers",
        "params (B)",
        "AdamW step before GiB",
        "before GiB",
        "surgery peak GiB",
        "after GiB",
        "transient MiB",
        "transient % of after",
        "AdamW step after GiB",
    ]
    return f"`upcycle_experts` under FakeTensorMode: {fake}\n\n{_table(head, rows, 'llr' + 'r' * 8)}"


def validation_section(runs: list[Upcycling]) -> str:
    """Meta vs real at the validation layer counts, and the real per-layer extrapolation to 16 layers."""
    by = {(u.device, u.layers): u for u in runs if u.case == MAIN_CASE}
    fields = ("step_before", "before", "peak", "after", "step_after")
    rows = []
    for layers in VALIDATION_LAYERS:
        real, meta = by.get(("cpu", layers)), by.get(("meta", layers))
        if real and meta:
            for f in fields:
                rows.append(
                    [layers, f, f"{getattr(real, f):,}", f"{getattr(meta, f):,}", f"{getattr(real, f) - getattr(meta, f):+,}"]
                )
    out = _table(["layers", "quantity", "real CPU B", "meta B", "real - meta B"], rows, "llrrr")
    (l1, l2), full = VALIDATION_LAYERS, by.get(("meta", OLMOE_LAYERS))
    r1, r2 = by.get(("cpu", l1)), by.get(("cpu", l2))
    if r1 and r2 and full:
        ext = []
        for f in fields:
            slope = (getattr(r2, f) - getattr(r1, f)) / (l2 - l1)
            predicted = getattr(r2, f) + slope * (OLMOE_LAYERS - l2)
            ext.append([f, mib(slope), gib(predicted), gib(getattr(full, f)), f"{predicted / getattr(full, f) - 1:+.3%}"])
        t1, t2 = r1.transient, r2.transient
        out += (
            f"\n\nPer-layer extrapolation from the real runs (value at {l2} layers + {OLMOE_LAYERS - l2} x the {l1}->{l2} layer"
            f" slope) against the meta run at {OLMOE_LAYERS} layers:\n\n"
            + _table(
                ["quantity", "per layer MiB", f"extrapolated {OLMOE_LAYERS} GiB", f"meta {OLMOE_LAYERS} GiB", "difference"], ext
            )
            + f"\n\nTransient (peak - max(before, after)), real: {mib(t1)} MiB at {l1} layer(s), {mib(t2)} MiB at {l2}: one"
            " layer's worth, independent of depth (the surgery goes block by block)."
        )
    return out


def markdown(results: dict[str, Any], header: str) -> str:
    parts = [header]
    if "loss" in results:
        parts += ["## (a) The per-sample loss path in a 7B training step (fake tensors, measured)", loss_section(results["loss"])]
    if "head" in results:
        parts += [
            "## (a) The loss head alone, 7B shapes and a 128k vocabulary, bytes above its inputs (fake tensors, measured)",
            head_section(results["head"]),
        ]
    if "reducer" in results:
        parts += [
            f"## (a) The reducer's step, bytes above its inputs (real tensors, batch {REDUCER_BATCH} per rank, measured)",
            reducer_section(results["reducer"]),
        ]
    if "store" in results:
        parts += [
            "## (a) The score store (real tensors, measured)",
            store_section(results["store"]["fields"], results["store"]["growth"]),
        ]
    if "upcycle" in results:
        runs = [Upcycling(**{**u, "parameters": tuple(u["parameters"])}) for u in results["upcycle"]["runs"]]
        parts += [
            f"## (b) Expert upcycling 8 -> 16 experts, OLMoE-shaped, fp32 + AdamW state ({OLMOE_LAYERS} layers on the meta device)",
            upcycle_section(
                [u for u in runs if u.device == "meta" and u.layers == OLMOE_LAYERS], results["upcycle"]["fake_tensors"]
            ),
            "## (b) Validation: real CPU tensors vs meta, and per-layer extrapolation",
            validation_section(runs),
        ]
    return "\n\n".join(parts) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for callbacks.md and callbacks.json")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    parts = args.parts.split(",")
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {text}", file=sys.stderr, flush=True)

    results: dict[str, Any] = {}
    if "loss" in parts:
        results["loss"] = []
        for recipe in LOSS_RECIPES:
            for loss in LOSSES:
                results["loss"].append(loss_path(recipe, loss))
                say(f"7b {recipe} {loss}: peak {gib(results['loss'][-1]['peak'])} GiB")
    if "head" in parts:
        results["head"] = []
        for shape_name in HEAD_SHAPES:
            results["head"] += [loss_head(loss, trainable, shape_name) for trainable in (False, True) for loss in HEAD_LOSSES]
            say(f"loss head {shape_name}")
    if "reducer" in parts:
        results["reducer"] = {str(world): reducer_world(world) for world in (1, REDUCER_WORLD)}
        say("reducer")
    if "store" in parts:
        results["store"] = {"fields": store_fields(), "growth": [store_growth(order) for order in ("shuffled", "in order")]}
        say("store")
    if "upcycle" in parts:
        runs = [upcycle(case) for case in UPCYCLE_CASES]
        for layers in VALIDATION_LAYERS:
            runs += [upcycle(MAIN_CASE, layers, "meta"), upcycle(MAIN_CASE, layers, "cpu")]
            say(f"upcycle {layers} layer(s), real and meta")
        results["upcycle"] = {"fake_tensors": fake_tensor_attempt(), "runs": [asdict(u) for u in runs]}
        say("upcycle")
    wall = time.perf_counter() - start
    command = "python -m benchmarks.memory.callbacks " + " ".join(sys.argv[1:] if argv is None else argv)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"# Peak memory of the other callbacks\n\n{when}; `{command.strip()}`; {wall:.0f} s wall; {MACHINE}"
        f" (torch {torch.__version__}, {torch.get_num_threads()} threads). See the module docstring of"
        " benchmarks/memory/callbacks.py for what each table measures and how."
    )
    text = markdown(results, header)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "callbacks.md").write_text(text)
    extra = {"date": when, "command": command.strip(), "wall_seconds": wall, "torch": torch.__version__, "machine": MACHINE}
    (args.out / "callbacks.json").write_text(json.dumps({**extra, "units": "bytes", **results}, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
