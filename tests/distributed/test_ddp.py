"""Real 2-process runs on CPU with the gloo backend."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader, DistributedSampler

from tests.support.models import Classifier, blobs
from tests.support.processes import free_port, run_script
from tests.support.training import flat_params, trainer
from weightwise import IndexedDataset
from weightwise.callbacks import LossReweighting


def test_all_gather_variable_with_unequal_lengths(tmp_path):
    run_script("gather", str(tmp_path), str(free_port()))
    expected_ids = [0, 1, 2, 100, 101, 102, 103, 104]
    for rank, local in ((0, (0, 3)), (1, (3, 8))):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["ids"].tolist() == expected_ids
        assert out["losses"].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0, 14.0]
        assert out["local"] == local


def ddp_fit_run(out_dir: Path, strategy: str, *extra: str) -> list[dict]:
    run_script("ddp_fit", str(out_dir), strategy, *extra)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def linupper_ddp_run(tmp_path_factory) -> list[dict]:
    return ddp_fit_run(tmp_path_factory.mktemp("ddp_linupper"), "linupper")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["linupper", "quadratic"])
def test_ddp_weights_use_the_global_batch_and_match_single_process(tmp_path, strategy, request):
    from tests.scripts import (
        ddp_fit,  # the script's constants, so both runs see the same setup
    )

    ranks = request.getfixturevalue("linupper_ddp_run") if strategy == "linupper" else ddp_fit_run(tmp_path, strategy)

    # Every rank's score store holds every sample, seen once per epoch, with identical values.
    for field in ("loss", "ema", "weight", "count", "last_step"):
        assert torch.equal(ranks[0]["scores"][field], ranks[1]["scores"][field]), field
    assert ranks[0]["scores"]["count"].tolist() == [ddp_fit.EPOCHS] * ddp_fit.N_SAMPLES

    # One process fed each step's *global* batch (both ranks' samples, in the DistributedSampler's
    # order) takes the same steps: the weights were computed over the global batch.
    dataset = IndexedDataset(blobs(ddp_fit.N_SAMPLES))
    global_batches = []
    for epoch in range(ddp_fit.EPOCHS):
        shards = []
        for rank in (0, 1):
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        for start in range(0, len(shards[0]), ddp_fit.LOCAL_BATCH):
            global_batches.append([i for shard in shards for i in shard[start : start + ddp_fit.LOCAL_BATCH]])
    seed_everything(0)
    single = Classifier(lr=0.5)
    callback = LossReweighting(strategy, warmup_steps=0)
    trainer(max_epochs=1, callbacks=[callback]).fit(single, DataLoader(dataset, batch_sampler=global_batches))
    assert torch.allclose(ranks[0]["params"], flat_params(single), atol=1e-5)
    assert torch.allclose(ranks[0]["scores"]["weight"], callback.reducer.scores.weight, atol=1e-5)


@pytest.mark.slow
def test_ddp_checkpoint_resume_continues_the_same_run(tmp_path, linupper_ddp_run):
    from tests.scripts import ddp_fit

    ddp_fit_run(tmp_path, "linupper", "1")  # first epoch, then stop
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["weightwise"]["scores"]["count"].sum() == 48
    resumed = ddp_fit_run(tmp_path, "linupper", str(ddp_fit.EPOCHS), str(tmp_path / "last.ckpt"))
    straight = linupper_ddp_run
    assert torch.allclose(resumed[0]["params"], straight[0]["params"], atol=1e-6)
    for field in ("loss", "ema", "weight", "count", "last_step"):
        assert torch.allclose(resumed[1]["scores"][field].double(), straight[1]["scores"][field].double()), field


@pytest.mark.slow
def test_ddp_pruning_shards_one_plan_disjointly_on_every_rank(tmp_path):
    from tests.scripts import ddp_pruning

    run_script("ddp_pruning", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["plans"] == ranks[1]["plans"]  # identical decisions on every rank
    assert ranks[0]["ledger"]["samples_visited"] == ranks[1]["ledger"]["samples_visited"]
    pruned_epochs = 0
    for epoch, plan in ranks[0]["plans"].items():
        shard0, shard1 = ranks[0]["ids"][epoch], ranks[1]["ids"][epoch]
        assert not set(shard0) & set(shard1), epoch  # disjoint
        assert sorted(shard0 + shard1) == sorted(plan), epoch  # together exactly the plan, no repeats
        assert len(set(plan)) == len(plan)
        pruned_epochs += len(plan) < ddp_pruning.N_SAMPLES
    assert pruned_epochs >= 2
    for field in ("loss", "count", "weight"):
        assert torch.equal(ranks[0]["scores"][field].nan_to_num(-1), ranks[1]["scores"][field].nan_to_num(-1))


@pytest.mark.slow
def test_ddp_upcycling_mid_fit_keeps_ranks_identical(tmp_path):
    run_script("ddp_upcycling", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["num_experts"] == ranks[1]["num_experts"] == 8
    assert ranks[0]["steps"] == 9  # 3 epochs of 3 steps (6 batches over 2 ranks), surgery at step 2
    # DDP was re-wrapped for the new shapes: gradients still averaged, so parameters stay in lock-step.
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


@pytest.mark.slow
def test_ddp_layerwise_sampling_trains_only_active_layers_in_lock_step(tmp_path):
    run_script("ddp_layerwise", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"] and len(set(map(tuple, ranks[0]["history"]))) > 1
    snapshots = ranks[0]["snapshots"]
    for step in range(len(snapshots) - 1):
        active = ranks[0]["history"][step // 2]
        for layer in range(6):
            moved = not torch.equal(snapshots[step][layer], snapshots[step + 1][layer])
            assert moved == (layer in active), (step, layer)
            # gradients of the active layers were averaged across ranks: both ranks hold the same values
            assert torch.equal(snapshots[step + 1][layer], ranks[1]["snapshots"][step + 1][layer])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ist", "upcycling"])
def test_ranks_with_different_data_take_the_same_decisions(tmp_path, mode):
    run_script("ddp_agreement", str(tmp_path), mode)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    if mode == "ist":
        assert len(ranks[0]["history"]) == 20
        assert ranks[0]["history"] == ranks[1]["history"]  # the same layers in every period
        assert torch.equal(ranks[0]["importance"], ranks[1]["importance"])
    else:
        for name, utility in ranks[0]["utility"].items():
            assert torch.equal(utility, ranks[1]["utility"][name]) and utility.sum() > 0, name
            assert torch.equal(ranks[0]["copies"][name], ranks[1]["copies"][name]), name
