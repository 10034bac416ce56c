"""Lightning's DeepSpeedStrategy, ZeRO-1/2/3, real 2-process runs on CPU (gloo).

The strategy is Lightning's own with its CUDA-only device plumbing bridged (``helpers.CPUDeepSpeedStrategy``):
DeepSpeed's engine, ZeRO partitioning and sharded checkpoints are the real ones. Each run combines
LossReweighting (scores gathered over ranks) with DataPruning (a self-sharding InfoBatch sampler).
"""

from pathlib import Path

import pytest
import torch
from helpers import Classifier, CPUDeepSpeedStrategy, indexed_loader, trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_distributed import SCRIPTS, run_script

from weightwise.callbacks import ExpertUpcycling, LayerwiseSampling

pytestmark = pytest.mark.slow
EPOCHS = 2


def fit(out_dir: Path, strategy: str, epochs: int, resume_from: Path | None = None) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    run_script(str(SCRIPTS / "deepspeed_fit.py"), str(out_dir), strategy, str(epochs), *([str(resume_from)] if resume_from else []))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> list[dict]:
    return fit(tmp_path_factory.mktemp("ddp"), "ddp", EPOCHS)


def assert_same_training(ranks: list[dict], reference: list[dict], epochs: range) -> None:
    for rank, expected in zip(ranks, reference):
        assert torch.allclose(rank["params"], expected["params"], atol=1e-6)
        for field, value in expected["scores"].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(rank["scores"][field], value), field
        assert [rank["ids"][e] for e in epochs] == [expected["ids"][e] for e in epochs]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_exactly_like_ddp(tmp_path, ddp_run, stage):
    ranks = fit(tmp_path, f"zero{stage}", EPOCHS)
    assert_same_training(ranks, ddp_run, range(EPOCHS))
    # The sampler sharded itself: the ranks' samples are disjoint in every epoch, and pruned.
    for epoch in range(EPOCHS):
        assert not set(ranks[0]["ids"][epoch]) & set(ranks[1]["ids"][epoch])
    assert ranks[0]["ledger"]["samples_visited"] < ranks[0]["ledger"]["samples_full"]
    # Both ranks saw every sample's loss: the score store is global.
    assert ranks[0]["scores"]["count"].sum() == ranks[0]["ledger"]["samples_visited"]
    # SampleReport reads that store: the same rows as under DDP, written once (rank 0) as CSV.
    assert ranks[0]["report"] == ranks[1]["report"] == ddp_run[0]["report"] and len(ranks[0]["report"]) == 6
    assert (tmp_path / "weightwise_samples.csv").exists()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sharded_checkpoint_carries_callback_state_and_resumes_exactly(tmp_path, ddp_run, stage):
    fit(tmp_path / "first", f"zero{stage}", 1)
    checkpoint = tmp_path / "first" / "last.ckpt"
    assert checkpoint.is_dir()  # DeepSpeed's sharded layout: one optimizer shard per rank
    shards = sorted(p.name for p in (checkpoint / "checkpoint").iterdir())
    assert [s for s in shards if "optim_states" in s] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    states = torch.load(checkpoint / "checkpoint" / [s for s in shards if "model_states" in s][0], weights_only=False)
    assert {"LossReweighting", "DataPruning"} <= set(states["callbacks"])
    assert states["weightwise"]["scores"]["count"].sum() > 0  # the score store travels with the shards

    resumed = fit(tmp_path / "resumed", f"zero{stage}", EPOCHS, resume_from=checkpoint)
    assert_same_training(resumed, ddp_run, range(1, EPOCHS))


@pytest.mark.parametrize("callback", [ExpertUpcycling(at_step=1), LayerwiseSampling("lisa")], ids=["upcycling", "layerwise"])
def test_shape_and_freezing_callbacks_refuse_deepspeed_with_the_way_out(callback):
    # DeepSpeedStrategy subclasses DDPStrategy: the check must not take it for DDP. (Checked on the
    # Trainer, without starting an engine: DeepSpeed's communication state cannot be torn down and
    # set up again inside one test process.)
    run = trainer(devices=1, strategy=CPUDeepSpeedStrategy(stage=2), max_steps=1, callbacks=[callback])
    with pytest.raises(MisconfigurationException, match="cannot run under DeepSpeed.*" + ("weightwise upcycle" if isinstance(callback, ExpertUpcycling) else "strategy='ddp'")):
        callback.on_fit_start(run, Classifier())


def test_upcycling_under_deepspeed_goes_through_the_saved_model(tmp_path):
    """The way out that ExpertUpcycling's error names, end to end under ZeRO-3 (sharded parameters):
    train, consolidate the shards, save_pretrained, `weightwise upcycle`, train the grown model."""
    import subprocess
    import sys

    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    from tiny_moe import logits, tiny_moe
    from transformers import AutoModelForCausalLM

    tiny_moe("mixtral", num_experts=4, top_k=2).save_pretrained(tmp_path / "E")
    run_script(str(SCRIPTS / "deepspeed_moe.py"), str(tmp_path / "phase1"), "3", str(tmp_path / "E"), "3")

    convert_zero_checkpoint_to_fp32_state_dict(tmp_path / "phase1" / "last.ckpt", tmp_path / "phase1.pt")
    state = torch.load(tmp_path / "phase1.pt", weights_only=False)["state_dict"]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "E")
    before = logits(trained, torch.arange(12).view(1, 12))
    trained.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    assert not torch.allclose(logits(trained, torch.arange(12).view(1, 12)), before)  # phase 1 did train
    trained.save_pretrained(tmp_path / "E_trained")

    done = subprocess.run(
        [sys.executable, "-m", "weightwise.cli", "upcycle", str(tmp_path / "E_trained"), str(tmp_path / "2E"),
         "--factor", "2", "--method", "granular"], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "2E")
    assert grown.config.num_local_experts == 8
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logits(grown, ids), logits(trained, ids), atol=1e-5)  # granular upcycling is exact

    run_script(str(SCRIPTS / "deepspeed_moe.py"), str(tmp_path / "phase2"), "3", str(tmp_path / "2E"), "2")
    losses = torch.load(tmp_path / "phase2" / "losses.pt")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
