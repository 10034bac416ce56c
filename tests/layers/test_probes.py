"""Suppression probes: a layer responds at a fraction of its strength, and everything is restored."""

import torch

from tests.support.models import TinyLlama
from weightwise.layers import suppressed


def test_a_suppressed_layer_scales_its_residual_contribution():
    model = TinyLlama(layers=2).model.eval()
    ids = torch.randint(0, 64, (1, 8))
    seen = {}
    layer, after = model.model.layers[0], model.model.layers[1]
    layer.register_forward_pre_hook(lambda module, args: seen.__setitem__("in", args[0]))
    after.register_forward_pre_hook(lambda module, args: seen.__setitem__("out", args[0]))  # what the model passes on
    with torch.no_grad():
        before = model(input_ids=ids).logits
        full = seen["out"] - seen["in"]
        with suppressed([layer], 0.25):
            model(input_ids=ids)
            torch.testing.assert_close(seen["out"] - seen["in"], 0.25 * full)
        with suppressed([layer], 0.0):
            model(input_ids=ids)
            torch.testing.assert_close(seen["out"], seen["in"])  # factor 0: the layer is skipped
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # the hook is gone


def test_lora_adapters_are_scaled_as_the_reference_and_restored():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(TinyLlama(layers=2).model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    layer = model.base_model.model.model.layers[1]
    q = layer.self_attn.q_proj
    assert q.scaling["default"] == 2.0
    with suppressed([layer], 0.25):
        assert q.scaling["default"] == 0.5 and layer.self_attn.v_proj.scaling["default"] == 0.5
        assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0  # others untouched
    assert q.scaling["default"] == 2.0
