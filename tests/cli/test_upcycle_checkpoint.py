"""`weightwise upcycle --checkpoint`: the model's weights read from what a Lightning fit saved (a .ckpt
file, a distributed checkpoint directory), and bad input refused with the fix. The 2-process routes
(FSDP2, ZeRO-3) are in tests/distributed/test_upcycle_between_fits.py."""

import pytest
import torch
from torch.distributed.checkpoint import save as dcp_save
from transformers import AutoModelForCausalLM

from tests.support.models import TinyMoELM, logits, moe_loader
from tests.support.training import trainer
from weightwise.cli import main
from weightwise.integrations.checkpoints import CheckpointError, checkpoint_format, load_from_checkpoint

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny top-1 Mixtral trained 2 steps by a real Trainer, its untrained folder and its .ckpt."""
    root = tmp_path_factory.mktemp("trained")
    module = TinyMoELM(top_k=1)
    module.model.save_pretrained(root / "E")  # what the fit started from
    run = trainer(max_steps=2)
    run.fit(module, moe_loader())
    run.save_checkpoint(root / "last.ckpt")
    return root, module.model.eval()


def test_a_plain_checkpoint_is_grown_into_a_model_that_computes_the_trained_function(trained, tmp_path, capsys):
    root, model = trained
    main(["upcycle", str(root / "E"), str(tmp_path / "2E"), "--checkpoint", str(root / "last.ckpt"), "--selection", "weight-norm"])
    assert "file checkpoint, prefix 'model.'" in capsys.readouterr().out
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "2E").eval()
    assert type(grown).__name__ == "MixtralForCausalLM" and grown.config.num_local_experts == 8
    untrained = AutoModelForCausalLM.from_pretrained(root / "E").eval()
    assert not torch.allclose(logits(untrained, IDS), logits(model, IDS))  # the fit moved the weights: read from the .ckpt
    # top-1 Mixtral renormalises: duplicates, here chosen by weight norm, keep the function (float rounding only)
    torch.testing.assert_close(logits(grown, IDS), logits(model, IDS), rtol=0, atol=1e-5)


def test_a_wrong_prefix_names_the_prefixes_that_hold_the_model(trained, tmp_path, capsys):
    root, _ = trained
    with pytest.raises(SystemExit) as exit_:
        main(["upcycle", str(root / "E"), str(tmp_path / "x"), "--checkpoint", str(root / "last.ckpt"), "--prefix", "net."])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "no weights of the model under prefix 'net.'" in message and "pass --prefix 'model.'" in message
    assert not (tmp_path / "x").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_distributed_checkpoint_is_read_under_either_lightning_root(trained, tmp_path):
    """ModelParallelStrategy saves the module under ``state_dict.``, FSDPStrategy under ``model.``; only
    the model's tensors are read (the optimizer entries stay on disk)."""
    root, model = trained
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    for top in ("state_dict", "model"):
        dcp_save({top: weights, "optimizer_0": {"step": torch.tensor(2.0)}}, checkpoint_id=tmp_path / top, no_dist=True)
        fresh = AutoModelForCausalLM.from_pretrained(root / "E").eval()
        assert checkpoint_format(tmp_path / top) == "distributed"
        assert load_from_checkpoint(fresh, tmp_path / top) == "distributed"
        assert torch.equal(logits(fresh, IDS), logits(model, IDS))


def test_a_checkpoint_of_another_configuration_or_no_checkpoint_is_refused(trained, tmp_path):
    from tests.support.models import tiny_moe

    root, _ = trained
    wider = tiny_moe("mixtral", num_experts=8, top_k=1)
    with pytest.raises(CheckpointError, match=r"6 weights .* do not fit the model.*gate.weight': \(4, 32\) saved, \(8, 32\) in the model"):
        load_from_checkpoint(wider, root / "last.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint: expected a file"):
        load_from_checkpoint(wider, tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_from_checkpoint(wider, tmp_path / "missing")
