"""ComputeMeter against torch's FlopCounterMode on a tiny Llama: forwards, the backward rule, sources, tokens."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.support.models import TinyLlama
from weightwise.compute import ComputeMeter, count_tokens, spending


@pytest.fixture(scope="module")
def llama():
    return TinyLlama(layers=2).model


def counted(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


def test_forward_and_backward_match_flop_counter(llama):
    """A step's forward is FlopCounterMode's exactly, and so is the backward rule's count, 2x the
    forward with every parameter trainable (the 6N rule)."""
    x = torch.randint(0, 64, (2, 16))
    forward, loss = counted(lambda: llama(input_ids=x, labels=x).loss)
    backward, _ = counted(loss.backward)
    llama.zero_grad()
    with ComputeMeter(llama) as meter:
        for _ in range(3):  # the first call is measured, the next two come from the cache
            loss = llama(input_ids=x, labels=x).loss
            with meter.backward():
                loss.backward()
    llama.zero_grad()
    assert meter.spent.forward_flops == 3 * forward > 0
    assert meter.spent.backward_flops == 3 * backward == 2 * meter.spent.forward_flops
    assert meter.spent.backward_tokens == 3 * x.numel()
    assert meter.spent.by_source["model"] == meter.spent.flops


@pytest.mark.parametrize("frozen", [("embed", 0), (1,), ("embed", 1), ("embed", 0, 1)])
def test_frozen_layers_skip_what_autograd_skips(llama, frozen):
    """Frozen layers need no weight gradients (and nothing below the lowest trainable layer needs any):
    the rule counts what FlopCounterMode counts over the real backward, as backward="measured" does."""
    x = torch.randint(0, 64, (2, 16))
    for part in frozen:
        for p in (llama.model.embed_tokens if part == "embed" else llama.model.layers[part]).parameters():
            p.requires_grad_(False)
    try:
        loss = llama(input_ids=x, labels=x).loss
        backward, _ = counted(loss.backward)
        meters = {}
        for mode in ("rule", "measured"):
            with ComputeMeter(llama, backward=mode) as meter:
                loss = llama(input_ids=x, labels=x).loss
                with meter.backward():
                    loss.backward()
            meters[mode] = meter.spent
    finally:
        for p in llama.parameters():
            p.requires_grad_(True)
        llama.zero_grad()
    assert meters["measured"].backward_flops == backward
    assert meters["rule"].backward_flops == backward
    assert backward < 2 * meters["rule"].forward_flops  # what the 6N rule would have counted


def test_shapes_are_counted_separately_and_no_grad_calls_are_forward_only(llama):
    short, long = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 16))
    f_short, _ = counted(lambda: llama(input_ids=short))
    f_long, _ = counted(lambda: llama(input_ids=long))
    with ComputeMeter(llama) as meter, torch.no_grad():
        llama(input_ids=short)
        llama(input_ids=long)
        with spending("scoring"):
            llama(input_ids=long)
        llama(input_ids=short)
    assert meter.spent.by_source["no_grad_forward"] == 2 * f_short + f_long
    assert meter.spent.by_source["scoring"] == f_long
    assert meter.spent.backward_flops == meter.spent.backward_tokens == 0


def test_outside_modules_are_reference_models_and_nested_calls_count_once(llama):
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    flops, _ = counted(lambda: reference(x))
    with ComputeMeter(llama) as meter, torch.no_grad():
        reference(x)
    assert flops == 2 * 5 * (8 * 16 + 16 * 4)
    assert meter.spent.by_source["reference_model"] == meter.spent.forward_flops == flops


def test_hooks_are_removed_and_a_raising_forward_leaves_the_meter_usable(llama):
    before = (len(llama._forward_pre_hooks), len(torch.nn.modules.module._global_forward_pre_hooks))
    x = torch.randint(0, 64, (2, 8))
    with ComputeMeter(llama) as meter, torch.no_grad():
        llama(input_ids=x)
        with pytest.raises(IndexError):
            llama(input_ids=torch.full((2, 8), 999))  # an id outside the vocabulary
        llama(input_ids=x)
    assert (len(llama._forward_pre_hooks), len(torch.nn.modules.module._global_forward_pre_hooks)) == before
    f, _ = counted(lambda: llama(input_ids=x))
    assert meter.spent.forward_flops == 2 * f


def test_count_tokens():
    assert count_tokens({"labels": torch.zeros(2, 3, dtype=torch.long), "input_ids": torch.zeros(2, 5, dtype=torch.long)}) == 10
    assert count_tokens((torch.randn(4, 8), torch.zeros(4, dtype=torch.long))) == 4  # no token ids: a row is a token
    assert count_tokens(((), {"input_ids": torch.zeros(3, 7, dtype=torch.long)})) == 21
    assert count_tokens("text") is None


def test_bad_settings():
    with pytest.raises(ValueError, match="measure"):
        ComputeMeter(torch.nn.Linear(2, 2), measure="sometimes")
    with pytest.raises(ValueError, match="backward"):
        ComputeMeter(torch.nn.Linear(2, 2), backward="guess")
    with pytest.raises(ValueError, match="source"):
        with spending("elsewhere"):
            pass


def test_a_module_that_grows_is_counted_anew():
    """A surgery that changes a module (expert upcycling) changes its FLOPs for the same inputs."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    with ComputeMeter(model) as meter, torch.no_grad():
        model(x)
        model[1] = torch.nn.Linear(16, 32)
        model(x)
    assert meter.spent.forward_flops == 2 * 3 * 8 * 16 * 2 + 2 * 3 * 16 * (4 + 32)


def test_every_call_counts_value_dependent_flops():
    """FLOPs that depend on the values (rows routed to an expert, as in a Mixture-of-Experts):
    "per_signature" repeats the first call's count, "every_call" counts each call as FlopCounterMode does."""

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.expert = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.expert(x[x[:, 0] > 0])  # only the rows routed here

    model = Routed()
    batches = [torch.randn(16, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    expected = [counted(lambda x=x: model(x))[0] for x in batches]
    assert len(set(expected)) > 1  # the routing differs between batches, and so do the FLOPs
    spent = {}
    for measure in ("per_signature", "every_call"):
        with ComputeMeter(model, measure=measure) as meter, torch.no_grad():
            for x in batches:
                model(x)
        spent[measure] = meter.spent.forward_flops
    assert spent["every_call"] == sum(expected)
    assert spent["per_signature"] == len(batches) * expected[0]


@pytest.mark.parametrize("backward", ["rule", "measured"])
def test_moe_experts_through_grouped_mm_count_what_eager_experts_count(backward):
    """transformers 5 runs a MoE's experts with ``torch._grouped_mm``, which FlopCounterMode has no
    formula for (the experts would count zero); weightwise's formula counts the products the eager
    per-expert loop does - every routed token through its experts - forward and backward."""
    from tests.support.models import tiny_moe

    x = torch.randint(0, 97, (2, 12))
    spent = {}
    for implementation in ("eager", "grouped_mm"):
        torch.manual_seed(0)
        model = tiny_moe("mixtral", num_experts=4, top_k=2)
        model.config._experts_implementation = implementation
        with ComputeMeter(model, backward=backward) as meter:
            loss = model(input_ids=x, labels=x).loss
            with meter.backward():
                loss.backward()
        spent[implementation] = meter.spent
    assert spent["grouped_mm"].forward_flops == spent["eager"].forward_flops
    assert spent["grouped_mm"].backward_flops == spent["eager"].backward_flops
