"""Tiny, randomly initialised transformers MoE models of each supported family."""

import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_moe(family: str, num_experts: int = 4, top_k: int = 2, norm_topk_prob: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    if family == "mixtral":
        config = MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=top_k)
        model = MixtralForCausalLM(config)
    elif family == "qwen2_moe":
        config = Qwen2MoeConfig(
            **COMMON,
            intermediate_size=24,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=norm_topk_prob,
            decoder_sparse_step=1,
        )
        model = Qwen2MoeForCausalLM(config)
    elif family == "qwen3_moe":
        config = Qwen3MoeConfig(
            **COMMON, head_dim=8, intermediate_size=24, moe_intermediate_size=16, num_experts=num_experts,
            num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob, decoder_sparse_step=1,
        )
        model = Qwen3MoeForCausalLM(config)
    elif family == "olmoe":
        config = OlmoeConfig(
            **COMMON, intermediate_size=16, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob
        )
        model = OlmoeForCausalLM(config)
    else:
        raise ValueError(family)
    # Routers are initialised to zeros in some families: give them real routing decisions.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.ndim == 2:
                param.normal_(0, 0.5)
    return model.eval()


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits
