"""upcycle_dense: dense Llama/Mistral/Qwen2/Qwen3 -> Mixtral/Qwen2-MoE/Qwen3-MoE, against the dense model."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from weightwise.experts import upcycle_dense

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
DENSE = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, "MixtralForCausalLM"),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, "MixtralForCausalLM"),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, "Qwen2MoeForCausalLM"),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, "Qwen3MoeForCausalLM"),
}
IDS = torch.tensor([[5, 17, 3, 88, 41, 2, 9, 60, 33], [1, 2, 3, 4, 5, 6, 7, 8, 96]])


def dense_model(family: str = "llama", seed: int = 0, **overrides):
    config_class, model_class, _ = DENSE[family]
    torch.manual_seed(seed)
    extra = {"head_dim": 8} if family == "qwen3" else {}
    return model_class(config_class(**{**COMMON, **extra, **overrides})).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("family", sorted(DENSE))
@pytest.mark.parametrize(("method", "experts", "top_k", "granularity"), [("copy", 4, 2, None), ("copy", 8, 1, None), ("granular", 4, 2, 2), ("granular", 6, 3, 3)])
def test_copies_and_granular_shards_compute_the_dense_function(family, method, experts, top_k, granularity):
    dense = dense_model(family)
    moe = upcycle_dense(dense, experts, top_k, method=method, granularity=granularity, generator=generator())
    assert type(moe).__name__ == DENSE[family][2] and moe.upcycle_report.exact
    block = moe.model.layers[0].mlp
    assert block.experts.gate_up_proj.shape == (experts, 2 * 48 // (granularity or 1), 32)
    # the routers are not trivial: different tokens go to different experts, and the output is still the dense one
    chosen = block.gate(torch.randn(64, 32))[2]
    assert chosen.unique().numel() > top_k
    torch.testing.assert_close(logits(moe), logits(dense), rtol=0, atol=2e-6)


def test_granular_layout_is_megatrons_virtual_groups():
    dense = dense_model()
    moe = upcycle_dense(dense, 6, 3, method="granular", granularity=3, generator=generator())
    mlp, block = dense.model.layers[1].mlp, moe.model.layers[1].mlp
    router = block.gate.weight
    assert torch.equal(router[0], router[2]) and torch.equal(router[3], router[5]) and not torch.equal(router[2], router[3])
    width = 16
    for expert in range(6):  # expert i*G + g is shard g of copy i
        shard = slice((expert % 3) * width, (expert % 3 + 1) * width)
        assert torch.equal(block.experts.gate_up_proj[expert, :width], mlp.gate_proj.weight[shard])
        assert torch.equal(block.experts.gate_up_proj[expert, width:], mlp.up_proj.weight[shard])
        torch.testing.assert_close(block.experts.down_proj[expert], mlp.down_proj.weight[:, shard] * 3, rtol=0, atol=0)


def test_megatron_scaling_is_an_option_and_not_exact_for_swiglu():
    dense = dense_model()
    moe = upcycle_dense(dense, 4, 2, method="granular", scaling="megatron", generator=generator())
    assert not moe.upcycle_report.exact
    gate = moe.model.layers[0].mlp.experts.gate_up_proj[0, :24]
    torch.testing.assert_close(gate, dense.model.layers[0].mlp.gate_proj.weight[:24] * 2 ** (1 / 3))
    assert (logits(moe) - logits(dense)).abs().max() > 1e-4


@pytest.mark.parametrize("per_matrix", [False, True])
def test_drop_upcycling_reinitialises_a_fraction_of_each_experts_units(per_matrix):
    dense = dense_model()
    moe = upcycle_dense(dense, 4, 2, method="drop", drop_ratio=0.25, drop_per_matrix=per_matrix, generator=generator())
    mlp, experts = dense.model.layers[0].mlp, moe.model.layers[0].mlp.experts
    assert not moe.upcycle_report.exact
    changed_sets = []
    for e in range(4):
        gate = (experts.gate_up_proj[e, :48] != mlp.gate_proj.weight).all(dim=1)
        up = (experts.gate_up_proj[e, 48:] != mlp.up_proj.weight).all(dim=1)
        down = (experts.down_proj[e] != mlp.down_proj.weight).all(dim=0)
        unchanged = ~(experts.gate_up_proj[e, :48] != mlp.gate_proj.weight).any(dim=1)
        assert int(gate.sum()) == int(up.sum()) == int(down.sum()) == 12  # int(48 * 0.25) units, whole rows/columns
        assert int(unchanged.sum()) == 36  # the others are the dense units, untouched
        assert torch.equal(gate, up) == (not per_matrix)  # the paper: one set per expert; the code: one per matrix
        changed_sets.append(gate)
        # drawn from the statistics of the values they replace
        new = experts.gate_up_proj[e, :48][gate]
        old = mlp.gate_proj.weight[gate]
        assert abs(float(new.std() / old.std()) - 1) < 0.15 and abs(float(new.mean() - old.mean())) < 0.3 * float(old.std())
    assert not all(torch.equal(changed_sets[0], s) for s in changed_sets[1:])  # each expert its own units
    # the router is Drop-Upcycling's torch_rand_002: zero-mean uniform, std 0.02
    router = moe.model.layers[0].mlp.gate.weight
    assert abs(float(router.mean())) < 1e-6 and float(router.abs().max()) <= 0.04  # bounded: uniform, half-width 0.02·√3 about the draw mean
    assert abs(float(router.std()) - 0.02) < 0.002


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_and_load_as_the_moe_class(tmp_path, family):
    dense = dense_model(family)
    moe = upcycle_dense(dense, 4, 2, method="drop", generator=generator())
    moe.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == DENSE[family][2] and loaded.config.num_experts_per_tok == 2
    torch.testing.assert_close(logits(loaded), logits(moe), rtol=0, atol=1e-6)


def trained_one_step(optimizer_class):
    dense = dense_model().train()
    optimizer = optimizer_class(dense.parameters(), lr=1e-3)
    dense(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    return dense, optimizer


def test_optimizer_keeps_shared_state_and_swaps_the_mlp_for_experts():
    dense, optimizer = trained_one_step(torch.optim.AdamW)
    attention = dense.model.layers[0].self_attn.q_proj.weight
    moment = optimizer.state[attention]["exp_avg"]
    old_mlp = dense.model.layers[0].mlp.down_proj.weight
    moe = upcycle_dense(dense, 4, 2, optimizer=optimizer, generator=generator())
    params = optimizer.param_groups[0]["params"]
    assert [id(p) for p in params] == [id(p) for p in moe.parameters()]  # the order a rebuilt optimizer would have
    assert moe.model.layers[0].self_attn.q_proj.weight is attention and optimizer.state[attention]["exp_avg"] is moment
    assert old_mlp not in optimizer.state and moe.model.layers[0].mlp.experts.down_proj not in optimizer.state  # fresh: the references'
    moe(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()  # trains the MoE
    assert optimizer.state[moe.model.layers[0].mlp.experts.down_proj]["exp_avg"].shape == (4, 32, 48)


def test_copied_optimizer_state_is_laid_out_like_the_weights():
    dense, optimizer = trained_one_step(torch.optim.Adam)
    mlp = dense.model.layers[1].mlp
    gate_avg, down_sq = (optimizer.state[mlp.gate_proj.weight]["exp_avg"], optimizer.state[mlp.down_proj.weight]["exp_avg_sq"])
    moe = upcycle_dense(dense, 4, 2, method="granular", optimizer=optimizer, optimizer_state="copy", generator=generator())
    experts = moe.model.layers[1].mlp.experts
    state = optimizer.state[experts.gate_up_proj]
    torch.testing.assert_close(state["exp_avg"][3, :24], gate_avg[24:], rtol=0, atol=0)  # expert 3 = shard 1 of copy 1
    # down_proj is scaled by G = 2: its gradient by 1/2, so its second moment by 1/4
    torch.testing.assert_close(optimizer.state[experts.down_proj]["exp_avg_sq"][0], down_sq[:, :24] / 4)
    assert moe.model.layers[1].mlp.gate.weight not in optimizer.state  # the router is new


def test_refuses_what_it_cannot_upcycle():
    with pytest.raises(ValueError, match="upcycle_experts"):
        upcycle_dense(transformers.MixtralForCausalLM(transformers.MixtralConfig(**COMMON, num_local_experts=2)))
    with pytest.raises(ValueError, match="biases"):
        upcycle_dense(dense_model(attention_bias=True))
    with pytest.raises(ValueError, match="multiple of granularity"):
        upcycle_dense(dense_model(), 5, 2, method="granular")
    with pytest.raises(ValueError, match="divisible"):
        upcycle_dense(dense_model(), 10, 2, method="granular", granularity=5)
    with pytest.raises(ValueError, match="needs method='granular'"):
        upcycle_dense(dense_model(), 4, 2, granularity=2)
    with pytest.raises(ValueError, match="drop_ratio"):
        upcycle_dense(dense_model(), 4, 2, method="drop", drop_ratio=1.5)
    with pytest.raises(ValueError, match="top_k"):
        upcycle_dense(dense_model(), 4, 5)
