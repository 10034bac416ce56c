import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from weightwise.layers import find_layer_stack


@pytest.mark.parametrize(
    "model, expected",
    [
        (LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)), "model.layers"),
        (GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2)), "transformer.h"),
        (BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)), "encoder.layer"),
    ],
)
def test_finds_the_layer_stack_of_transformers_models(model, expected):
    name, stack = find_layer_stack(model)
    assert name == expected and len(stack) == 3


def test_explicit_path_and_errors():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layers='dotted.path"):
        find_layer_stack(model)
    with pytest.raises(ValueError, match="not a ModuleList"):
        find_layer_stack(model, "0")


class ExpertsAsModuleList(torch.nn.Module):
    """A transformers-4.x-style MoE block: its experts in a ModuleList (longer than the layer stack)."""

    def __init__(self, experts: int = 8):
        super().__init__()
        self.gate = torch.nn.Linear(4, experts)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(experts))


class MoEDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"mlp": ExpertsAsModuleList()}) for _ in range(3))


def test_an_moe_blocks_expert_list_is_never_the_stack():
    name, stack = find_layer_stack(MoEDecoder())
    assert name == "layers" and len(stack) == 3  # not layers.0.mlp.experts (8 long)


class MoEBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = ExpertsAsModuleList()


class AttentionBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(4, 4)


class HybridMoEDecoder(torch.nn.Module):
    """A decoder list of two layer classes (attention and MoE blocks, as hybrid models have), or of one layer."""

    def __init__(self, layers: int = 4):
        super().__init__()
        self.layers = torch.nn.ModuleList(MoEBlock() if i % 2 == 0 else AttentionBlock() for i in range(layers))


@pytest.mark.parametrize("layers", [4, 1])
def test_an_expert_list_is_not_taken_for_the_stack_of_a_mixed_or_one_layer_decoder(layers):
    with pytest.raises(ValueError, match="pass layers="):
        find_layer_stack(HybridMoEDecoder(layers))
