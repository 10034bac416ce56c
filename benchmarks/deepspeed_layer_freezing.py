"""What freezing layers saves under DeepSpeed ZeRO-1/2/3: toggled mid-run, frozen at start, rebuilt per period.

Evidence for the LayerwiseSampling-under-DeepSpeed design (README, "Multi-GPU"). A 16-layer Llama
(hidden 256, 13.2M parameters) gets a real DeepSpeed engine (one process, CPU, gloo; fp32, AdamW)
and takes 3 steps in three setups:

* ``full``: every parameter trains;
* ``toggled``: every parameter is trainable when the engine starts, then 14 of the 16 layers get
  ``requires_grad=False`` (what a callback flipping ``requires_grad`` does);
* ``frozen at start``: the same 14 layers are frozen before ``deepspeed.initialize``;
* ``rebuilt per period``: what ``LayerwiseSampling`` does under DeepSpeed - frozen at start, the
  ZeRO optimizer rebuilt with per-(group, layer) groups (:class:`weightwise.integrations.deepspeed.ZeroLayerOptimizer`),
  3 steps, then rebuilt for two other layers (one stays) and 3 more steps.

Reported: the ZeRO optimizer's fp32 master partitions, its Adam state and its flat parameter
buffers, in MiB, after the last step; for the rebuilt run also the time of each rebuild and whether
the first period's flat buffer was freed. Run: .venv/bin/python benchmarks/deepspeed_layer_freezing.py
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import time
import weakref

with socket.socket() as _probe:  # a free port for the one-process group
    _probe.bind(("127.0.0.1", 0))
    os.environ.setdefault("MASTER_PORT", str(_probe.getsockname()[1]))
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")

import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from weightwise.integrations.deepspeed import (
    ZeroLayerOptimizer,
    flat_buffers,
    master_partition_bytes,
)
from weightwise.layers import find_layer_stack
from weightwise.layers.freezing import optimizer_state_bytes

MIB = 2**20
ACTIVE = (3, 9)
NEXT_ACTIVE = (9, 12)


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=16, num_attention_heads=8)
    )


def freeze_all_but(net: LlamaForCausalLM, active: tuple[int, ...]) -> None:
    _, stack = find_layer_stack(net)
    for i, layer in enumerate(stack):
        layer.requires_grad_(i in active)


def train(engine: deepspeed.DeepSpeedEngine, steps: int = 3) -> None:
    for _ in range(steps):
        ids = torch.randint(0, 1024, (2, 32))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()


def timed_rebuild(layerwise: ZeroLayerOptimizer, engine: deepspeed.DeepSpeedEngine) -> float:
    start = time.perf_counter()
    layerwise.rebuild(engine)
    return (time.perf_counter() - start) * 1000


def run(setup: str, stage: int) -> dict[str, str]:
    net = model()
    if setup in ("frozen at start", "rebuilt per period"):
        freeze_all_but(net, ACTIVE)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    _, stack = find_layer_stack(net)
    layer_of = {p: i for i, layer in enumerate(stack) for p in layer.parameters()}
    layerwise = ZeroLayerOptimizer(optimizer, layer_of | {p: None for p in net.parameters() if p not in layer_of})
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    extra = {"rebuild ms": "-", "first period's buffer freed": "-"}
    if setup == "toggled":
        freeze_all_but(net, ACTIVE)
    if setup == "rebuilt per period":
        first = timed_rebuild(layerwise, engine)
        buffer = weakref.ref(flat_buffers(engine.optimizer)[0])
        train(engine)
        freeze_all_but(net, NEXT_ACTIVE)
        second = timed_rebuild(layerwise, engine)
        gc.collect()
        extra = {"rebuild ms": f"{first:.0f}, {second:.0f}", "first period's buffer freed": "yes" if buffer() is None else "no"}
    train(engine)
    zero = engine.optimizer
    row = {
        "fp32 master MiB": f"{master_partition_bytes(zero) / MIB:.1f}",
        "Adam state MiB": f"{optimizer_state_bytes(zero.optimizer) / MIB:.1f}",
        "flat parameter buffer MiB": f"{sum(t.numel() * t.element_size() for t in flat_buffers(zero)) / MIB:.1f}",
    }
    engine.destroy()
    return row | extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="1,2,3")
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    print(f"16-layer Llama, 13.2M parameters, fp32, AdamW, {len(ACTIVE)} of 16 layers active; DeepSpeed {deepspeed.__version__}, CPU")
    print("| ZeRO stage | setup | fp32 master MiB | Adam state MiB | flat parameter buffer MiB | rebuild ms | first period's buffer freed |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for stage in map(int, args.stages.split(",")):
        for setup in ("full", "toggled", "frozen at start", "rebuilt per period"):
            row = run(setup, stage)
            print(f"| {stage} | {setup} | " + " | ".join(row.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
