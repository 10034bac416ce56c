"""The simulated models: Llama shapes, built on the meta device and made fake (no download, no storage)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.memory.tracking import Accelerator


@dataclass(frozen=True)
class Shape:
    """A Llama's shape and the batch it trains on."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    batch: int = 4
    seq: int = 512

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            tie_word_embeddings=False,
        )


SHAPES: dict[str, Shape] = {
    # TinyLlama-1.1B
    "1.1b": Shape(2048, 5632, 22, 32, 4, 32000),
    # Llama-2-7B
    "7b": Shape(4096, 11008, 32, 32, 32, 32000),
    # for the tests and smoke runs (3 layers: the fewest that give LISA's 2 layers a choice)
    "tiny": Shape(64, 128, 3, 4, 2, 256, batch=2, seq=16),
}

# LoRA as in the H100 reference run: peft defaults (alpha 8, no dropout) with r=8 on q_proj and v_proj.
LORA_TARGETS = ("q_proj", "v_proj")
LORA_RANK = 8


def build(shape: Shape, accelerator: Accelerator, *, lora: bool = False) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` in fp32 on ``accelerator`` (values: see its ``materialize``),
    optionally wrapped in a peft LoRA model (base weights frozen, adapters trainable)."""
    with torch.device("meta"):
        model: nn.Module = LlamaForCausalLM(shape.config())
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=LORA_RANK, target_modules=list(LORA_TARGETS)))
    model.train()
    return accelerator.materialize(model)
