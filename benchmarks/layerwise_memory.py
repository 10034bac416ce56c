"""Optimizer-state and gradient memory of full fine-tuning vs LISA vs LoRA, measured on CPU.

A 16-layer Llama (hidden 256, randomly initialised) takes a few AdamW steps; reported are the
bytes of optimizer state and of gradients after the last step, which is what LISA's memory claim
is about. (Peak accelerator memory with a >= 1B model needs the GPU script; this machine has none.)

Run: .venv/bin/python benchmarks/layerwise_memory.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from weightwise.layers import find_layer_stack
from weightwise.layers.freezing import OptimizerStateStash, optimizer_state_bytes

MIB = 2**20


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=16, num_attention_heads=8)
    return LlamaForCausalLM(config)


def steps(net, optimizer, n=3, before_step=None) -> tuple[int, int]:
    for i in range(n):
        if before_step:
            before_step(i)
        ids = torch.randint(0, 1024, (2, 32))
        net(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters() if p.grad is not None)
        optimizer.zero_grad(set_to_none=True)
    return optimizer_state_bytes(optimizer), grads


def main() -> None:
    rows = []
    net = model()
    params = sum(p.numel() for p in net.parameters())
    rows.append(("full fine-tuning",) + steps(net, torch.optim.AdamW(net.parameters(), lr=1e-4)))

    net = model()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    _, stack = find_layer_stack(net)
    stash = OptimizerStateStash("release")

    def lisa(i):  # a new pair of active layers every step, as LayerwiseSampling does every K steps
        active = {(2 * i) % 16, (2 * i + 1) % 16}
        stash.freeze((p for j, layer in enumerate(stack) if j not in active for p in layer.parameters()), optimizer)
        stash.thaw((p for j in active for p in stack[j].parameters()), optimizer)

    rows.append(("LISA, 2 of 16 layers (release)",) + steps(net, optimizer, before_step=lisa))
    try:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(model(), LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        trainable = [p for p in net.parameters() if p.requires_grad]
        rows.append(("LoRA r=8 (attention)",) + steps(net, torch.optim.AdamW(trainable, lr=1e-4)))
    except ImportError:
        rows.append(("LoRA r=8 (peft not installed)", 0, 0))

    print(f"16-layer Llama, {params / 1e6:.1f}M parameters, AdamW, fp32")
    print("| setup | optimizer state MiB | gradients MiB |")
    print("| --- | ---: | ---: |")
    for name, state, grads in rows:
        print(f"| {name} | {state / MIB:.1f} | {grads / MIB:.1f} |")


if __name__ == "__main__":
    main()
