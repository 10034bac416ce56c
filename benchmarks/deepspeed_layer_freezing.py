"""What freezing layers saves under DeepSpeed ZeRO-1/2: toggled mid-run vs frozen before the engine starts.

Evidence for the LayerwiseSampling-under-DeepSpeed design (README, "Multi-GPU"). A 16-layer Llama
(hidden 256, 13.2M parameters) gets a real DeepSpeed engine (one process, CPU, gloo; fp32, AdamW)
and takes 3 steps in three setups:

* ``full``: every parameter trains;
* ``toggled``: every parameter is trainable when the engine starts, then 14 of the 16 layers get
  ``requires_grad=False`` (what a callback flipping ``requires_grad`` does);
* ``frozen at start``: the same 14 layers are frozen before ``deepspeed.initialize`` (what an
  engine - or its ZeRO optimizer - rebuilt for each period's active layers would hold).

Reported: the ZeRO optimizer's fp32 master partitions, its Adam state and its flat parameter
buffers, in MiB, after the last step. Run: .venv/bin/python benchmarks/deepspeed_layer_freezing.py
"""

from __future__ import annotations

import argparse
import os
import socket

with socket.socket() as _probe:  # a free port for the one-process group
    _probe.bind(("127.0.0.1", 0))
    os.environ.setdefault("MASTER_PORT", str(_probe.getsockname()[1]))
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from weightwise.freezing import optimizer_state_bytes  # noqa: E402
from weightwise.layers import find_layer_stack  # noqa: E402

MIB = 2**20
ACTIVE = (3, 9)


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=16, num_attention_heads=8)
    )


def freeze_all_but_active(net: LlamaForCausalLM) -> None:
    _, stack = find_layer_stack(net)
    for i, layer in enumerate(stack):
        layer.requires_grad_(i in ACTIVE)


def run(setup: str, stage: int) -> dict[str, float]:
    net = model()
    if setup == "frozen at start":
        freeze_all_but_active(net)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, zero, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    if setup == "toggled":
        freeze_all_but_active(net)
    for _ in range(3):
        ids = torch.randint(0, 1024, (2, 32))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    row = {
        "fp32 master MiB": sum(t.numel() * t.element_size() for t in zero.single_partition_of_fp32_groups) / MIB,
        "Adam state MiB": optimizer_state_bytes(zero.optimizer) / MIB,
        "flat parameter buffer MiB": sum(t.numel() * t.element_size() for t in zero.bit16_groups_flat) / MIB,
    }
    engine.destroy()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="1,2")
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    print(f"16-layer Llama, 13.2M parameters, fp32, AdamW, {len(ACTIVE)} of 16 layers active; DeepSpeed {deepspeed.__version__}, CPU")
    print("| ZeRO stage | setup | fp32 master MiB | Adam state MiB | flat parameter buffer MiB |")
    print("| --- | --- | ---: | ---: | ---: |")
    for stage in map(int, args.stages.split(",")):
        for setup in ("full", "toggled", "frozen at start"):
            row = run(setup, stage)
            print(f"| {stage} | {setup} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
