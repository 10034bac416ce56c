"""Block influence (ShortGPT) against hand-computed cases and the reference's formula, the
``"block_influence"`` policy's draw, and the policy in a real Trainer run."""

import math

import pytest
import torch
from torch import nn

from tests.support.models import TinyLlama, token_batches
from tests.support.training import trainer
from weightwise.callbacks import LayerwiseSampling
from weightwise.layers import BlockInfluenceLayers, block_influence, influence_totals, redundant_layers
from weightwise.layers.callback import POLICIES


class Rotate(nn.Module):
    """Turns every token's 2-d state by ``degrees``."""

    def __init__(self, degrees: float) -> None:
        super().__init__()
        a = math.radians(degrees)
        self.register_buffer("matrix", torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]))

    def forward(self, x):
        return x @ self.matrix.T


class FlipLast(nn.Module):
    """Negates the last position's state, leaves the others alone."""

    def forward(self, x, **kwargs):
        out = x.clone()
        out[:, -1] = -x[:, -1]
        return (out, None)  # a tuple output, as transformers 4.x layers return


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class Stack(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, input_ids=None, attention_mask=None):
        x = input_ids
        for layer in self.layers:
            out = layer(x)
            x = out[0] if isinstance(out, tuple) else out
        return x


def test_block_influence_by_hand():
    model = Stack(Rotate(0), Rotate(90), Rotate(180), FlipLast(), Zero())
    x = torch.randn(2, 4, 2) + 3.0
    batch = {"input_ids": x, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    # identity: cos 1; a quarter turn: cos 0; a half turn: cos -1; only the last token flipped: 1 - cos = 2 on the
    # one valid last token of 7 valid tokens; zero output: cos undefined, 0.5 as the reference's nan_to_num.
    expected = torch.tensor([0.0, 1.0, 2.0, 2 / 7, 0.5], dtype=torch.float64)
    torch.testing.assert_close(block_influence(model, [batch], "layers"), expected, atol=1e-6, rtol=0)
    unmasked = block_influence(model, [batch], model.layers, mask_key=None)  # the reference averages over padding too
    assert unmasked[3] == pytest.approx(4 / 8)
    angular = block_influence(model, [batch], "layers", angular=True)  # arccos(cos) / pi
    torch.testing.assert_close(angular[:3], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), atol=1e-3, rtol=0)
    totals, tokens = influence_totals(model, [batch, batch], "layers")
    assert float(tokens) == 14 and totals[1] == pytest.approx(14.0)  # sums over two batches: the reduction's input


def test_block_influence_matches_the_references_formula_except_for_the_last_layer():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4))
    with torch.no_grad():  # a trained final norm: its weight turns the states (at init, all ones, it only scales them)
        model.model.norm.weight.uniform_(0.2, 2.0)
    batches = [{"input_ids": torch.randint(0, 64, (2, 10))} for _ in range(2)]
    ours = block_influence(model, batches)

    def reference(hidden_in, hidden_out):  # shortgpt/metrics.py block_influence, per token
        d = hidden_in.shape[-1]
        x, y = hidden_in.reshape(-1, d), hidden_out.reshape(-1, d)
        sim = (x @ y.T) / (x.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True))
        return 1 - sim.diagonal().nan_to_num(nan=0.5)

    totals = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch, output_hidden_states=True).hidden_states  # embeddings, layer outputs, the last one normed
            for i in range(4):
                totals[i] += reference(hidden[i], hidden[i + 1]).sum().double()
    tokens = 2 * 2 * 10
    torch.testing.assert_close(ours[:3], totals[:3] / tokens, atol=1e-5, rtol=0)
    # The reference compares the last layer's input with the final norm's output; weightwise with the layer's own.
    assert abs(float(ours[3]) - float(totals[3] / tokens)) > 1e-3


def test_padding_is_masked_right_padded_rows_count_only_their_tokens():
    model = TinyLlama(layers=3).model
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    padded = block_influence(model, [{"input_ids": ids, "attention_mask": mask}])
    # the same tokens without padding: row 0 whole, row 1's first 5 tokens (causal attention: identical states)
    totals_a, tokens_a = influence_totals(model, [{"input_ids": ids[:1]}])
    totals_b, tokens_b = influence_totals(model, [{"input_ids": ids[1:, :5]}])
    torch.testing.assert_close(padded, (totals_a + totals_b) / (tokens_a + tokens_b), atol=1e-5, rtol=0)
    assert model.training  # the mode is restored


def test_redundant_layers_are_the_lowest_influence_first():
    model = Stack(*(Rotate(degrees) for degrees in (90, 10, 180, 20, 45)))
    batch = {"input_ids": torch.randn(1, 3, 2)}
    assert redundant_layers(model, [batch], 3) == [1, 3, 4]  # 10, 20 and 45 degrees
    assert redundant_layers(model, [batch], 0) == []
    with pytest.raises(ValueError, match="n=6"):
        redundant_layers(model, [batch], 6)
    with pytest.raises(ValueError, match="no batch"):
        block_influence(model, [])
    with pytest.raises(ValueError, match="layers="):  # layers of different classes: name the stack
        block_influence(Stack(Rotate(0), Zero()), [batch])
    with pytest.raises(ValueError, match="stack"):
        block_influence(nn.Linear(2, 2), [torch.randn(1, 2)])


def test_policy_draws_proportionally_to_influence_to_the_power_one_over_temperature():
    policy = BlockInfluenceLayers(4, 2, seed=3, temperature=0.5)
    assert torch.allclose(policy.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))  # uniform before a measurement
    assert policy.wants_influence(0) and not policy.wants_influence(1) and policy.wants_influence(5)
    policy.record_influence(0, torch.tensor([0.1, 0.3, 0.6, 0.0]))
    assert not policy.wants_influence(0)  # measured already (a resumed period does not measure twice)
    weights = torch.tensor([0.01, 0.09, 0.36, 1e-12], dtype=torch.float64)  # squared (1 / 0.5), BI floored at 1e-6
    torch.testing.assert_close(policy.probabilities(), weights / weights.sum())
    generator = torch.Generator().manual_seed(3 * 100_003 + 7)
    assert policy.choose(7) == sorted(torch.multinomial(weights / weights.sum(), 2, replacement=False, generator=generator).tolist())
    counts = torch.zeros(4)
    for period in range(300):
        counts[policy.choose(period)] += 1
    assert counts[2] > 280 and counts[1] > 200 and counts[3] == 0
    restored = BlockInfluenceLayers(4, 2, seed=3, temperature=0.5)
    restored.load_state_dict(policy.state_dict())
    assert restored.choose(11) == policy.choose(11) and restored.measured_period == 0
    with pytest.raises(ValueError, match="3 layers"):
        BlockInfluenceLayers(3, 1).record_influence(0, torch.zeros(4))
    with pytest.raises(ValueError, match="temperature"):
        BlockInfluenceLayers(3, 1, temperature=0.0)


def test_layerwise_sampling_measures_block_influence_on_the_batch_and_draws_by_it():
    assert POLICIES["block_influence"].n_layers == 2 and POLICIES["block_influence"].interval == 20
    sampling = LayerwiseSampling("block_influence", n_layers=2, interval=2, refresh_every=100)
    trainer(max_epochs=2, callbacks=[sampling]).fit(TinyLlama(), token_batches())
    assert len(sampling.history) == 4 and all(len(active) == 2 for active in sampling.history)
    # one measurement, before period 0: the untrained model (TinyLlama seeds its init) on the first batch
    first = next(iter(token_batches()))
    expected = block_influence(TinyLlama().model, [first])
    torch.testing.assert_close(sampling.importance, expected, atol=1e-6, rtol=0)
    assert sampling.chooser.measured_period == 0

    refreshed = LayerwiseSampling("block_influence", n_layers=2, interval=1, refresh_every=3)
    trainer(max_epochs=2, callbacks=[refreshed]).fit(TinyLlama(), token_batches())
    assert refreshed.chooser.measured_period == 6  # periods 0, 3, 6
    assert not torch.equal(refreshed.importance, expected)  # measured again on a trained model and another batch


def test_block_influence_measured_on_fixed_calibration_batches():
    calibration = [batch for _, batch in zip(range(3), token_batches(n=24, length=12))]
    sampling = LayerwiseSampling("block_influence", n_layers=2, interval=2, influence_data=calibration)
    trainer(max_epochs=1, callbacks=[sampling]).fit(TinyLlama(), token_batches())
    # measured once, before period 0, on the untrained model: the three calibration batches' tokens pooled
    torch.testing.assert_close(sampling.importance, block_influence(TinyLlama().model, calibration), atol=1e-6, rtol=0)
    assert not torch.equal(sampling.importance, block_influence(TinyLlama().model, [next(iter(token_batches()))]))


def test_bad_block_influence_settings_fail_at_construction():
    with pytest.raises(ValueError, match="refresh_every"):
        LayerwiseSampling("block_influence", refresh_every=0)
    with pytest.raises(ValueError, match="temperature"):
        LayerwiseSampling("block_influence", temperature=-1.0)
    with pytest.raises(ValueError, match="influence_data is for policy='block_influence'"):
        LayerwiseSampling("lisa", influence_data=[])

