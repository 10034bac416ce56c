"""ZeroLayerOptimizer's bookkeeping without an engine (the rebuild itself: tests/test_deepspeed.py)."""

import pytest
import torch

from tests.support.models import TinyLlama
from weightwise.integrations.deepspeed import (
    GROUP_KEY,
    ZeroLayerOptimizer,
    read_client_state,
)
from weightwise.layers import find_layer_stack


def layerwise_optimizer(model: torch.nn.Module) -> ZeroLayerOptimizer:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    proxy = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}], lr=1e-3)
    _, stack = find_layer_stack(model)
    layer_of = {p: i for i, layer in enumerate(stack) for p in layer.parameters()}
    layer_of.update({p: None for p in model.parameters() if p not in layer_of})
    return ZeroLayerOptimizer(proxy, layer_of)


def test_split_groups_are_one_per_user_group_and_layer_of_the_trainable_parameters():
    model = TinyLlama(layers=4).model
    zero = layerwise_optimizer(model)
    for i, layer in enumerate(model.model.layers):
        layer.requires_grad_(i in (1, 3))
    model.model.layers[3].mlp.requires_grad_(False)  # e.g. a part the user froze: never in a group
    groups = zero.split_groups()
    assert [key for key, _ in groups] == [(0, None), (0, 1), (0, 3), (1, None), (1, 1), (1, 3)]
    params = dict(groups)
    assert {id(p) for p in params[(0, 3)]} == {id(p) for p in model.model.layers[3].self_attn.parameters()}
    assert {id(p) for p in params[(1, None)]} == {id(model.model.norm.weight)}
    assert sum(p.numel() for _, ps in groups for p in ps) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_hyperparameters_follow_the_proxy_that_the_scheduler_drives():
    zero = layerwise_optimizer(TinyLlama(layers=2).model)
    schedule = torch.optim.lr_scheduler.LambdaLR(zero.proxy, lambda step: 0.5**step)
    split = torch.optim.AdamW(
        [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0, "weight_decay": 0.0, GROUP_KEY: key} for key in [(0, 0), (1, None)]]
    )
    zero.proxy.step()
    schedule.step()
    zero.sync_hyperparameters(split)
    assert [(g["lr"], g["weight_decay"]) for g in split.param_groups] == [(5e-4, 0.1), (5e-4, 0.0)]

    saved = zero.hyperparameters()
    schedule.step()
    zero.load_hyperparameters(saved)
    assert [g["lr"] for g in zero.proxy.param_groups] == [5e-4, 5e-4]
    with pytest.raises(ValueError, match="1 optimizer param groups, the optimizer 2"):
        zero.load_hyperparameters(saved[:1])


def test_reading_a_directory_that_is_no_deepspeed_checkpoint_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a DeepSpeed checkpoint directory"):
        read_client_state(tmp_path)


def test_groups_left_without_trainable_parameters_are_hidden_from_the_first_engine_build():
    model = TinyLlama(layers=2).model
    zero = layerwise_optimizer(model)
    for p in model.parameters():
        p.requires_grad_(p.dim() >= 2)  # e.g. LoRA: the norms-only group 1 has nothing trainable
    zero.hide_untrainable_groups()
    assert zero.proxy.param_groups == [zero.groups[0]] and len(zero.groups) == 2  # put back by the first rebuild
