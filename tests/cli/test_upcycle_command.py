import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.support.models import logits, tiny_moe
from weightwise.cli import main


def test_upcycle_command_grows_a_saved_model_and_keeps_its_function(tmp_path, capsys):
    model = tiny_moe("qwen3_moe", top_k=2)
    model.save_pretrained(tmp_path / "small")
    ids = torch.randint(0, 97, (2, 7))
    main(["upcycle", str(tmp_path / "small"), str(tmp_path / "big"), "--factor", "2", "--method", "granular"])
    assert "experts 4 -> 8" in capsys.readouterr().out
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "big").eval()
    assert grown.config.num_experts == 8 and grown.config.num_experts_per_tok == 4
    assert (logits(grown, ids) - logits(model, ids)).abs().max() <= 1e-5


def test_cli_rejects_bad_arguments():
    done = subprocess.run([sys.executable, "-m", "weightwise.cli", "upcycle", "a", "b", "--method", "x"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice" in done.stderr
    with pytest.raises(SystemExit):
        main(["upcycle"])


@pytest.mark.slow
def test_upcycle_from_dense_writes_a_moe_that_loads_as_its_class(tmp_path, capsys):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    dense = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    ).eval()
    dense.save_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 97, (2, 7))
    main(["upcycle", "--from-dense", str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "4", "--top-k", "2", "--method", "granular"])
    assert "4 experts" in capsys.readouterr().out
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(moe).__name__ == "Qwen3MoeForCausalLM" and moe.config.moe_intermediate_size == 24
    assert (logits(moe, ids) - logits(dense, ids)).abs().max() <= 1e-5


def test_cli_refuses_methods_of_the_other_path():
    with pytest.raises(SystemExit):
        main(["upcycle", "a", "b", "--method", "drop"])
    with pytest.raises(SystemExit):
        main(["upcycle", "--from-dense", "a", "b", "--method", "duplicate"])
