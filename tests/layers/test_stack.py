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
