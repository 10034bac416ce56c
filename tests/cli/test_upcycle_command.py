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
