"""The peak-memory simulator (benchmarks/memory) on a tiny Llama: its byte accounting, and that the
layer-sampling runs go through weightwise's freezing, which releases the frozen layers' AdamW state."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks.memory import report, run
from benchmarks.memory.methods import Recipe
from benchmarks.memory.models import SHAPES
from benchmarks.memory.simulate import STEPS, simulate
from benchmarks.memory.zero import per_rank

FP32 = 4
STEP_SCALAR = 4  # AdamW's per-parameter ``step``, a float32 scalar tensor


@pytest.fixture(scope="module")
def sims():
    return {m: simulate("tiny", m) for m in ("full", "lora", "lisa", "lisa+bf16frozen")}


@pytest.fixture(scope="module")
def layout():
    """Element and tensor counts of the tiny Llama: a decoder layer, everything outside the stack, buffers."""
    with torch.device("meta"):
        model = LlamaForCausalLM(SHAPES["tiny"].config())
    layer = list(model.model.layers[0].parameters())
    stack = {p for p in model.model.layers.parameters()}
    outside = [p for p in model.parameters() if p not in stack]
    return {
        "layer": sum(p.numel() for p in layer),
        "layer_tensors": len(layer),
        "outside": sum(p.numel() for p in outside),
        "outside_tensors": len(outside),
        "tensors": len(list(model.parameters())),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
    }


def adam_bytes(elements: int, tensors: int) -> int:
    return 2 * FP32 * elements + STEP_SCALAR * tensors


def test_full_fine_tuning_keeps_two_fp32_moments_per_parameter_and_a_gradient(sims, layout):
    full = sims["full"]
    assert full.peak["optimizer_state"] == adam_bytes(full.parameters, layout["tensors"]) == full.optimizer_state[-1]
    assert full.peak["gradients"] == FP32 * full.parameters  # the peak is in the optimizer step: every gradient is there
    assert full.peak["parameters"] == FP32 * full.parameters + layout["buffer_bytes"]


def test_lisa_through_weightwise_keeps_optimizer_state_of_the_active_layers_only(sims, layout):
    lisa = sims["lisa"]
    first, second, third = lisa.active_layers
    assert first != second == third and 0 in second
    # After the switch: the embeddings, head and norm, and the new layers - the old layers' state is released.
    expected = adam_bytes(
        layout["outside"] + len(second) * layout["layer"], layout["outside_tensors"] + len(second) * layout["layer_tensors"]
    )
    assert lisa.optimizer_state[1:] == [expected, expected]
    assert lisa.phase_peaks[f"step {STEPS} forward/backward"]["optimizer_state"] == expected
    # During step 2's forward/backward only state of layers active in both periods survives from step 1.
    kept = set(first) & set(second)
    survived = adam_bytes(
        layout["outside"] + len(kept) * layout["layer"], layout["outside_tensors"] + len(kept) * layout["layer_tensors"]
    )
    assert lisa.phase_peaks["step 2 forward/backward"]["optimizer_state"] == survived
    assert lisa.trainable == [layout["outside"] + 2 * layout["layer"]] * STEPS


def test_lisa_and_lora_peak_below_full_fine_tuning(sims):
    assert sims["lora"].total < sims["lisa"].total < sims["full"].total


def test_bf16_frozen_parameters_halve_the_frozen_bytes(sims, layout):
    mixed = sims["lisa+bf16frozen"]
    trainable = mixed.trainable[-1]
    assert mixed.peak["parameters"] == FP32 * trainable + 2 * (mixed.parameters - trainable) + layout["buffer_bytes"]
    assert mixed.total < sims["lisa"].total


def test_zero_stages_shard_more_and_more(sims):
    zero = per_rank(sims["full"], ranks=8)
    assert zero["zero3"] < zero["zero2"] <= zero["zero1"] < sims["full"].total


def test_method_names_are_checked():
    assert Recipe.parse("lisa_layers+bf16frozen+ckpt").ingredients == {"bf16frozen", "ckpt"}
    with pytest.raises(ValueError, match="unknown ingredient"):
        Recipe.parse("lisa+zero9")
    with pytest.raises(ValueError, match="pick one"):
        Recipe.parse("full+fused+forloop")


def test_command_line_writes_table_and_json(tmp_path, capsys):
    method = "lisa_layers+fused+linearce"  # also weightwise's loss from hidden states, under fake tensors
    run.main(["--models", "tiny", "--methods", method, "--out", str(tmp_path), "--no-chart"])
    (lisa,) = json.loads((tmp_path / "results.json").read_text())["simulations"]
    assert lisa["method"] == method and lisa["total"] == sum(lisa["peak"].values())
    assert lisa["zero_x8_per_rank"]["zero3"] < lisa["total"]
    row = f"| tiny | {method} |"
    assert row in (tmp_path / "results.md").read_text() and row in capsys.readouterr().out
    assert not (tmp_path / "peak_memory.png").exists()


def test_chart(sims, tmp_path):
    pytest.importorskip("matplotlib")
    report.chart(list(sims.values()), tmp_path / "peak.png")
    assert (tmp_path / "peak.png").read_bytes()[:4] == b"\x89PNG"
