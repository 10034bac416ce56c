"""Real 2-process DDP runs on CPU (gloo); the jobs are listed in ``tests/support/distributed.py``."""

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader, DistributedSampler

from tests.scripts import ddp_jobs
from tests.support.contracts import CASES
from tests.support.distributed import ACCUMULATION_MICRO_BATCHES, assert_equal_decisions
from tests.support.models import Classifier, blobs
from tests.support.training import flat_params, trainer
from weightwise import IndexedDataset
from weightwise.callbacks import LossReweighting
from weightwise.core.store import FIELDS

pytestmark = pytest.mark.slow


def test_all_gather_variable_with_unequal_lengths(ddp_runs):
    for rank, local in zip(ddp_runs("gather"), ((0, 3), (3, 8))):
        assert rank["ids"].tolist() == [0, 1, 2, 100, 101, 102, 103, 104]
        assert rank["losses"].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0, 14.0]
        assert rank["local"] == local


def single_process_reweighting(
    strategy: str, batches: list[list[int]], n_samples: int, **trainer_kwargs
) -> tuple[torch.Tensor, LossReweighting]:
    """One process fed each step's *global* batch, for comparison with the 2-process run."""
    seed_everything(0)
    single, callback = Classifier(lr=0.5), LossReweighting(strategy, warmup_steps=0, store_fields=FIELDS)
    fit = trainer(max_epochs=1, callbacks=[callback], **trainer_kwargs)
    fit.fit(single, DataLoader(IndexedDataset(blobs(n_samples)), batch_sampler=batches))
    return flat_params(single), callback


@pytest.mark.parametrize("strategy", ["linupper", "quadratic"])
def test_weights_use_the_global_batch_and_match_single_process(ddp_runs, strategy):
    ranks = ddp_runs(f"reweighting_{strategy}")
    n, batch = ddp_jobs.REWEIGHTING_SAMPLES, ddp_jobs.REWEIGHTING_BATCH
    # Every rank's score store holds every sample, seen once per epoch, with identical values.
    for field in ("loss", "ema", "weight", "count", "last_step"):
        assert torch.equal(ranks[0]["scores"][field], ranks[1]["scores"][field]), field
    assert ranks[0]["scores"]["count"].tolist() == [ddp_jobs.REWEIGHTING_EPOCHS] * n
    # One process fed each step's global batch (both ranks' samples, in the DistributedSampler's order)
    # takes the same steps: the weights were computed over the global batch.
    dataset = IndexedDataset(blobs(n))
    global_batches = []
    for epoch in range(ddp_jobs.REWEIGHTING_EPOCHS):
        shards = []
        for rank in (0, 1):
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        for start in range(0, len(shards[0]), batch):
            global_batches.append([i for shard in shards for i in shard[start : start + batch]])
    params, callback = single_process_reweighting(strategy, global_batches, n)
    assert torch.allclose(ranks[0]["params"], params, atol=1e-5)
    assert torch.allclose(ranks[0]["scores"]["weight"], callback.reducer.scores.weight, atol=1e-5)


def test_unequal_batches_per_rank_are_reduced_over_the_global_batch(ddp_runs):
    """Rank 0 trains 3 samples a step, rank 1 five: the update is the global batch's weighted mean."""
    ranks = ddp_runs("unequal_batches")
    params, callback = single_process_reweighting("linupper", [ddp_jobs.global_batch(step) for step in range(4)], 32)
    for rank in ranks:
        torch.testing.assert_close(rank["params"], params, rtol=0, atol=1e-6)
        torch.testing.assert_close(rank["weights"], callback.reducer.scores.weight, rtol=0, atol=1e-6)


def test_checkpoint_resume_continues_the_same_run(ddp_runs):
    resumed, straight = ddp_runs("reweighting_resumed"), ddp_runs("reweighting_linupper")
    assert torch.allclose(resumed[0]["params"], straight[0]["params"], atol=1e-6)
    for field in ("loss", "ema", "weight", "count", "last_step"):
        assert torch.allclose(resumed[1]["scores"][field].double(), straight[1]["scores"][field].double()), field


def test_uniform_with_gradient_accumulation_trains_like_plain_ddp(ddp_runs):
    for rank in ddp_runs("accumulation"):
        assert torch.equal(rank["uniform"], rank["plain"])


def test_reweighting_with_gradient_accumulation_normalises_each_micro_batchs_global_batch(ddp_runs):
    """accumulate_grad_batches=2, ranks with 3 and 5 samples a micro-batch: the weights are those of
    each micro-batch's global batch (8 samples) on its own, as one process fed those global
    micro-batches with the same accumulation computes them (docs/methods.md, gradient accumulation)."""
    ranks = ddp_runs("accumulation_reweighting")
    n = ACCUMULATION_MICRO_BATCHES
    micro_batches = [ddp_jobs.global_batch(m) for m in range(n)]
    params, callback = single_process_reweighting("linupper", micro_batches, 8 * n, accumulate_grad_batches=2)
    assert ranks[0]["steps"] == n // 2
    for rank in ranks:
        torch.testing.assert_close(rank["params"], params, rtol=0, atol=1e-6)
        torch.testing.assert_close(rank["weights"], callback.reducer.scores.weight, rtol=0, atol=1e-6)
    # The test tells the micro-batch from the optimizer step: weights normalised over both
    # micro-batches of a step (16 samples) train otherwise.
    steps = [micro_batches[m] + micro_batches[m + 1] for m in range(0, n, 2)]
    merged, merged_callback = single_process_reweighting("linupper", steps, 8 * n)
    assert not torch.allclose(merged_callback.reducer.scores.weight.float(), callback.reducer.scores.weight.float(), atol=1e-2)
    assert not torch.allclose(merged, params, atol=1e-4)


def test_token_losses_under_ddp_train_like_the_plain_language_model_loss(ddp_runs):
    for rank in ddp_runs("tokens"):
        torch.testing.assert_close(rank["tokens"], rank["plain"])


def test_pruning_shards_one_plan_disjointly_on_every_rank(ddp_runs):
    ranks = ddp_runs("pruning")
    assert ranks[0]["plans"] == ranks[1]["plans"]  # identical decisions on every rank
    assert ranks[0]["ledger"]["samples_visited"] == ranks[1]["ledger"]["samples_visited"]
    pruned_epochs = 0
    for epoch, plan in ranks[0]["plans"].items():
        shard0, shard1 = ranks[0]["ids"][epoch], ranks[1]["ids"][epoch]
        assert not set(shard0) & set(shard1), epoch  # disjoint
        assert sorted(shard0 + shard1) == sorted(plan), epoch  # together exactly the plan, no repeats
        assert len(set(plan)) == len(plan)
        pruned_epochs += len(plan) < ddp_jobs.PRUNING_SAMPLES
    assert pruned_epochs >= 2
    assert ranks[0]["scores"]["loss"].numel() == ddp_jobs.PRUNING_SAMPLES  # InfoBatch's store: the latest loss only
    for field, values in ranks[0]["scores"].items():
        if isinstance(values, torch.Tensor):
            assert torch.equal(values.nan_to_num(-1), ranks[1]["scores"][field].nan_to_num(-1)), field


def test_a_memory_mapped_score_store_gives_every_rank_the_in_memory_plans(ddp_runs):
    in_memory, mapped = ddp_runs("pruning"), ddp_runs("pruning_mapped")
    for rank in (0, 1):
        assert mapped[rank]["path"].name == f"rank{rank}"  # one copy per rank, written in lock-step
        assert mapped[rank]["plans"] == in_memory[rank]["plans"] and mapped[rank]["ids"] == in_memory[rank]["ids"]
        assert torch.equal(mapped[rank]["scores"]["loss"].nan_to_num(-1), in_memory[rank]["scores"]["loss"].nan_to_num(-1))
    assert mapped[0]["path"] != mapped[1]["path"]


def test_upcycling_mid_fit_keeps_ranks_identical(ddp_runs):
    ranks = ddp_runs("upcycling")
    assert ranks[0]["num_experts"] == ranks[1]["num_experts"] == 8
    assert ranks[0]["steps"] == 9  # 3 epochs of 3 steps (6 batches over 2 ranks), surgery at step 2
    # DDP was re-wrapped for the new shapes: gradients still averaged, so parameters stay in lock-step.
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


def test_layerwise_sampling_trains_only_active_layers_in_lock_step(ddp_runs):
    ranks = ddp_runs("layerwise")
    assert ranks[0]["history"] == ranks[1]["history"] and len(set(map(tuple, ranks[0]["history"]))) > 1
    snapshots = ranks[0]["snapshots"]
    for step in range(len(snapshots) - 1):
        active = ranks[0]["history"][step // 2]
        for layer in range(6):
            moved = not torch.equal(snapshots[step][layer], snapshots[step + 1][layer])
            assert moved == (layer in active), (step, layer)
            # gradients of the active layers were averaged across ranks: both ranks hold the same values
            assert torch.equal(snapshots[step + 1][layer], ranks[1]["snapshots"][step + 1][layer])


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_ranks_with_different_data_take_the_same_decisions(ddp_runs, case):
    """docs/architecture.md, contract 5: every decision is a function of values all ranks share."""
    rank0, rank1 = ddp_runs(f"agreement/ddp/{case.name}")
    assert rank0, "the case recorded no decision"
    assert_equal_decisions(rank0, rank1)
    if "layers" in rank0:
        assert len({tuple(layers) for layers in rank0["layers"]}) > 1  # decisions that changed: the test has teeth
    if "copies" in rank0:
        assert rank0["copies"] is not None  # the surgery happened


def test_a_stream_resumed_from_rank_0s_checkpoint_continues_every_ranks_shard(ddp_runs):
    straight, resumed = ddp_runs("stream_straight"), ddp_runs("stream_resumed")
    assert not torch.equal(straight[0]["seen"], straight[1]["seen"])  # each rank streams its own documents
    for rank in (0, 1):
        assert torch.equal(resumed[rank]["seen"], straight[rank]["seen"][3:])
        assert torch.equal(resumed[rank]["params"], straight[rank]["params"])
    assert torch.equal(resumed[0]["params"], resumed[1]["params"])
