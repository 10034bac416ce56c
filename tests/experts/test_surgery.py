import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.support.models import FAMILIES, logits, tiny_moe
from weightwise.experts import find_moe_blocks, upcycle_experts

INPUT = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_granular_split_preserves_the_function_for_top2(family, norm_topk_prob, tmp_path):
    model = tiny_moe(family, num_experts=4, top_k=2, norm_topk_prob=norm_topk_prob)
    before = logits(model, INPUT)
    report = upcycle_experts(model, factor=2, method="granular")
    after = logits(model, INPUT)
    assert report.exact and report.num_experts == (4, 8) and report.top_k == (2, 4)
    assert (after - before).abs().max() <= 1e-5
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 4
    block = next(iter(find_moe_blocks(model).values()))
    assert block.num_experts == 8 and block.intermediate_size == 8

    model.save_pretrained(tmp_path)  # a standard model of the same class
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert (logits(reloaded, INPUT) - before).abs().max() <= 1e-5


@pytest.mark.parametrize("family, norm_topk_prob", [("mixtral", True), ("qwen3_moe", False), ("olmoe", False), ("qwen2_moe", True)])
def test_duplication_with_top1_preserves_the_function(family, norm_topk_prob, tmp_path):
    model = tiny_moe(family, num_experts=4, top_k=1, norm_topk_prob=norm_topk_prob)
    before = logits(model, INPUT)
    report = upcycle_experts(model, factor=2, method="duplicate")
    assert report.exact and report.num_experts == (4, 8) and report.top_k == (1, 1)
    assert (logits(model, INPUT) - before).abs().max() <= 1e-5
    model.save_pretrained(tmp_path)
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), INPUT) - before).abs().max() <= 1e-5


def test_duplication_with_top2_is_reported_inexact_and_changes_outputs():
    model = tiny_moe("mixtral", top_k=2)
    before = logits(model, INPUT)
    report = upcycle_experts(model, factor=2)
    assert not report.exact
    assert (logits(model, INPUT) - before).abs().max() > 1e-3  # copies of the best expert tie and crowd out the second


def test_router_noise_splits_tokens_among_copies_and_barely_moves_top1_outputs():
    model = tiny_moe("mixtral", top_k=1, norm_topk_prob=True)
    before = logits(model, INPUT)
    upcycle_experts(model, factor=2, router_noise=1e-2, generator=torch.Generator().manual_seed(0))
    router = model.model.layers[0].mlp.gate.weight
    assert not torch.equal(router[0], router[1])  # the copies' router rows differ
    hidden = torch.randn(200, 32)
    chosen = (hidden @ router.T).argmax(-1)
    assert {int(c) % 2 for c in chosen} == {0, 1}  # both copies of sources receive tokens
    # A token keeps its source expert (identical copies: same output) unless its two best sources
    # were within the noise of each other.
    changed = ((logits(model, INPUT) - before).abs().amax(-1) > 1e-5).float().mean()
    assert changed <= 0.1


def adam_step(param: torch.Tensor, state: dict, grad: torch.Tensor) -> torch.Tensor:
    """The update one AdamW step makes to ``param`` from ``state`` given ``grad`` (a fresh optimizer)."""
    copy = torch.nn.Parameter(param.detach().clone())
    optimizer = torch.optim.AdamW([copy], lr=1e-3, eps=1e-12, weight_decay=0.0)
    optimizer.state[copy] = {k: v.clone() for k, v in state.items()}
    copy.grad = grad.clone()
    optimizer.step()
    return copy.detach() - param.detach()


@pytest.mark.parametrize("method", ["duplicate", "granular"])
def test_adam_state_follows_the_gradient_scale_so_the_next_step_is_the_sources(method):
    """Weights scaled by s get gradients scaled by 1/s: moments / s and / s^2 keep Adam's next step."""
    model = tiny_moe("qwen3_moe", top_k=1, norm_topk_prob=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-12, weight_decay=0.0)
    for _ in range(3):  # moments of different sizes per element
        optimizer.zero_grad()
        model(input_ids=INPUT, labels=INPUT).loss.backward()
        optimizer.step()
    block = next(iter(find_moe_blocks(model).values()))
    params = block.expert_parameters()
    old = {n: (p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()}) for n, p in params.items()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}  # the next gradient of the original experts
    expected = {n: adam_step(weight, state, grads[n]) for n, (weight, state) in old.items()}

    report = upcycle_experts(model, factor=2, method=method, optimizer=optimizer)
    scale = 2.0  # duplicate without renormalisation, or granular: outputs scaled by m = 2
    # The same next gradient in the new parametrisation: gate/up unchanged, down (scaled by s) / s.
    new_grads = block.split_experts(grads, 2, 1 / scale) if method == "granular" else block.gather_experts(
        grads, next(iter(report.sources.values())), 1 / scale
    )
    new_expected = block.split_experts(expected, 2, 1.0) if method == "granular" else block.gather_experts(
        expected, next(iter(report.sources.values())), 1.0
    )
    optimizer.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.grad = new_grads[n]
    optimizer.step()
    for n, p in params.items():
        # element by element, relative: a moment off by a factor s or s^2 moves the step by far more
        torch.testing.assert_close(p.detach() - before[n], new_expected[n], rtol=1e-4, atol=1e-9)


def test_router_state_follows_its_rows_and_training_goes_on():
    model = tiny_moe("qwen3_moe", top_k=1, norm_topk_prob=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=INPUT, labels=INPUT).loss.backward()
    optimizer.step()
    block = next(iter(find_moe_blocks(model).values()))
    router = block.router_weight
    old_router_avg = optimizer.state[router]["exp_avg"].clone()
    upcycle_experts(model, factor=2, optimizer=optimizer)
    assert optimizer.state[block.expert_parameters()["down_proj"]]["exp_avg"].shape == block.expert_parameters()["down_proj"].shape
    assert torch.equal(optimizer.state[router]["exp_avg"][5], old_router_avg[2])
    model(input_ids=INPUT, labels=INPUT).loss.backward()  # training goes on with the grown model
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_utility_selection_gives_useful_experts_more_copies():
    model = tiny_moe("mixtral", top_k=1, norm_topk_prob=True)
    names = list(find_moe_blocks(model))
    utility = {name: torch.tensor([10.0, 0.0, 0.0, 2.0]) for name in names}
    before = logits(model, INPUT)
    report = upcycle_experts(model, factor=2, selection="utility", utility=utility)
    assert report.copies[names[0]].tolist() == [4, 1, 1, 2] and report.copies[names[0]].sum() == 8
    assert report.sources[names[0]].tolist() == [0, 0, 0, 0, 1, 2, 3, 3]
    assert (logits(model, INPUT) - before).abs().max() <= 1e-5  # top-1 + renormalisation: exact for any counts


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="factor"):
        upcycle_experts(tiny_moe("mixtral"), factor=1)
    with pytest.raises(ValueError, match="utility"):
        upcycle_experts(tiny_moe("mixtral"), selection="utility")
    with pytest.raises(ValueError, match="no MoE block"):
        upcycle_experts(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="divisible"):
        upcycle_experts(tiny_moe("mixtral"), factor=3, method="granular")


def test_reset_drops_the_upcycled_tensors_optimizer_state():
    model = tiny_moe("mixtral", top_k=1, norm_topk_prob=True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=INPUT, labels=INPUT).loss.backward()
    optimizer.step()
    upcycle_experts(model, factor=2, optimizer=optimizer, optimizer_state="reset")
    for block in find_moe_blocks(model).values():
        assert all(p not in optimizer.state for p in (*block.expert_parameters().values(), block.router_weight))
    assert model.model.embed_tokens.weight in optimizer.state  # the rest keeps its state
    model(input_ids=INPUT, labels=INPUT).loss.backward()
    optimizer.step()  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unscaled_copies_as_the_reference_change_a_non_renormalising_router():
    preserved, reference = tiny_moe("olmoe", top_k=1), tiny_moe("olmoe", top_k=1)
    before = logits(preserved, INPUT)
    assert upcycle_experts(preserved, factor=2).exact
    assert (logits(preserved, INPUT) - before).abs().max() <= 1e-5
    report = upcycle_experts(reference, factor=2, preserve_function=False)
    assert not report.exact and (logits(reference, INPUT) - before).abs().max() > 1e-3


def test_router_bias_follows_the_copies_and_takes_the_references_noise():
    model = tiny_moe("mixtral", top_k=1, norm_topk_prob=True)
    with pytest.raises(ValueError, match="has no bias"):
        upcycle_experts(model, factor=2, router_noise=0.01, noise_target="bias")
    for block in find_moe_blocks(model).values():  # routers with a bias (as gpt-oss')
        block.block.gate.bias = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    gate = next(iter(find_moe_blocks(model).values())).block.gate
    weight = gate.weight.detach().clone()
    report = upcycle_experts(model, factor=2, router_noise=0.01, noise_target="bias", generator=torch.Generator().manual_seed(0))
    sources = next(iter(report.sources.values()))
    bias = gate.bias.detach()
    first = torch.ones(8, dtype=torch.bool)
    first[1:] = sources[1:] != sources[:-1]
    assert torch.equal(bias[first], torch.tensor([0.5, -1.0, 2.0, 0.0]))  # each source's first instance exact
    noise = bias[~first] - torch.tensor([0.5, -1.0, 2.0, 0.0])
    assert (noise != 0).all() and noise.abs().max() < 0.1  # ~0.01 x std of the copied biases (1.3)
    assert torch.equal(gate.weight.detach(), weight[sources])  # router rows copied exactly
