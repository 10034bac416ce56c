"""Lightning's DeepSpeedStrategy, ZeRO-1/2/3, real 2-process runs on CPU (gloo).

The strategy is Lightning's own with its CUDA-only device plumbing bridged
(``tests.support.strategies.CPUDeepSpeedStrategy``): DeepSpeed's engine, ZeRO partitioning and
sharded checkpoints are the real ones. The data jobs (``tests.scripts.deepspeed_jobs.fit``) combine
LossReweighting (scores gathered over ranks) with DataPruning (a self-sharding InfoBatch sampler);
the layer jobs (``deepspeed_jobs.layerwise``) train a tiny Llama with LayerwiseSampling, whose ZeRO
optimizer is rebuilt every period. Both are compared with DDP. The jobs are listed in
``tests/support/distributed.py`` and run in one launch.
"""

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tests.support.contracts import CASES
from tests.support.distributed import FIT_EPOCHS, ZERO3_AGREEMENT, assert_equal_decisions, assert_same_training
from tests.support.models import Classifier, TinyLlama
from tests.support.strategies import CPUDeepSpeedStrategy
from tests.support.training import trainer
from weightwise.callbacks import ExpertUpcycling, LayerwiseSampling
from weightwise.integrations.deepspeed import read_client_state

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_exactly_like_ddp(sharded_runs, stage):
    ranks, ddp_run = sharded_runs(f"fit/zero{stage}"), sharded_runs("fit/ddp")
    assert_same_training(ranks, ddp_run, range(FIT_EPOCHS))
    # The sampler sharded itself: the ranks' samples are disjoint in every epoch, and pruned.
    for epoch in range(FIT_EPOCHS):
        assert not set(ranks[0]["ids"][epoch]) & set(ranks[1]["ids"][epoch])
    assert ranks[0]["ledger"]["samples_visited"] < ranks[0]["ledger"]["samples_full"]
    # Both ranks saw every sample's loss: the score store is global.
    assert ranks[0]["scores"]["count"].sum() == ranks[0]["ledger"]["samples_visited"]
    # SampleReport reads that store: the same rows as under DDP, written once (rank 0) as CSV.
    assert ranks[0]["report"] == ranks[1]["report"] == ddp_run[0]["report"] and len(ranks[0]["report"]) == 6
    assert (sharded_runs.root / f"fit/zero{stage}" / "weightwise_samples.csv").exists()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sharded_checkpoint_carries_callback_state_and_resumes_exactly(sharded_runs, stage):
    checkpoint = sharded_runs.root / f"sharded/zero{stage}/first" / "last.ckpt"
    assert checkpoint.is_dir()  # DeepSpeed's sharded layout: one optimizer shard per rank
    shards = sorted(p.name for p in (checkpoint / "checkpoint").iterdir())
    assert [s for s in shards if "optim_states" in s] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    states = torch.load(checkpoint / "checkpoint" / [s for s in shards if "model_states" in s][0], weights_only=False)
    assert {"LossReweighting", "DataPruning"} <= set(states["callbacks"])
    assert states["weightwise"]["scores"]["count"].sum() > 0  # the score store travels with the shards

    resumed = sharded_runs(f"sharded/zero{stage}/resumed")
    assert_same_training(resumed, sharded_runs("fit/ddp"), range(1, FIT_EPOCHS))


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_mid_epoch_checkpoint_resumes_the_pruned_epoch_where_it_stopped(sharded_runs, strategy):
    """Saved after step 5 = the first of epoch 1's pruned steps (epoch 0: 40 samples, 2 ranks x 5 a
    step). A plain DataLoader restarts from its first batch; DataPruning's checkpoint holds the
    epoch's plan and how many samples each rank trained, so the resumed run trains exactly the rest."""
    first = sharded_runs(f"mid_epoch/{strategy}/first")
    assert [len(first[0]["ids"][e]) for e in sorted(first[0]["ids"])] == [20, 5]  # it did stop mid-epoch
    resumed = sharded_runs(f"mid_epoch/{strategy}/resumed")
    for rank, expected in zip(resumed, sharded_runs("fit/ddp")):
        assert torch.allclose(rank["params"], expected["params"], atol=1e-6)
        assert sorted(rank["ids"]) == [1] and rank["ids"][1] == expected["ids"][1][5:]  # the rest of epoch 1 only
        assert rank["ledger"]["samples_visited"] == expected["ledger"]["samples_visited"]


def test_upcycling_refuses_deepspeed_with_the_way_out():
    # DeepSpeedStrategy subclasses DDPStrategy: the check must not take it for DDP. (Checked on the
    # Trainer, without starting an engine: DeepSpeed's communication state cannot be torn down and
    # set up again inside one test process.)
    callback = ExpertUpcycling(at_step=1)
    run = trainer(devices=1, strategy=CPUDeepSpeedStrategy(stage=2), max_steps=1, callbacks=[callback])
    with pytest.raises(MisconfigurationException, match="cannot run under DeepSpeed.*weightwise upcycle"):
        callback.on_fit_start(run, Classifier())


@pytest.mark.parametrize(
    ("strategy", "options", "message"),
    [
        (dict(stage=0), {}, "ZeRO stage 0: use stage 1, 2 or 3"),
        (dict(stage=2, offload_optimizer=True), {}, "ZeRO-Offload"),
        (dict(stage=2), dict(optimizer_state="offload"), "optimizer_state='offload': use 'release'"),
    ],
)
def test_layerwise_sampling_refuses_what_it_cannot_rebuild_under_deepspeed(strategy, options, message):
    callback = LayerwiseSampling("lisa", **options)
    run = trainer(devices=1, strategy=CPUDeepSpeedStrategy(**strategy), max_steps=1, callbacks=[callback])
    with pytest.raises(MisconfigurationException, match=message):
        callback.setup(run, Classifier(), "fit")


LAYERWISE_EPOCHS = 3  # 2 steps an epoch, periods of 3 steps: layer 5 stays active across the change, 2 leaves, 1 joins


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_layerwise_sampling_under_zero_trains_like_ddp_holding_only_active_layers(sharded_runs, stage):
    ranks, ddp_layerwise = sharded_runs(f"layerwise/zero{stage}"), sharded_runs("layerwise/ddp")
    history = ddp_layerwise[0]["history"]
    assert history == [[2, 5], [1, 5]] and all(rank["history"] == history for rank in ranks)
    for rank, expected in zip(ranks, ddp_layerwise):
        # Same parameters (two AdamW groups, weight decay, a per-step LR schedule), same learning rates.
        # ZeRO-1/2: bit for bit. ZeRO-3 sums gradients in another order: plain ZeRO-3 (no callback)
        # differs from DDP by 1.8e-6 on this model, LayerwiseSampling under ZeRO-3 by 1.6e-6.
        if stage == 3:
            assert rank["partitioned"] == sum(1 for _ in TinyLlama().parameters())  # each rank holds shards only
            assert torch.allclose(rank["params"], expected["params"], rtol=0, atol=1e-5)
        else:
            assert torch.equal(rank["params"], expected["params"])
        assert rank["lrs"] == expected["lrs"] and len({lr for step in rank["lrs"] for _, lr in step}) == 6
        # A frozen layer does not change at all while frozen.
        for step in range(len(rank["snapshots"]) - 1):
            for layer in range(6):
                moved = not torch.equal(rank["snapshots"][step][layer], rank["snapshots"][step + 1][layer])
                assert moved == (layer in history[step // 3]), (step, layer)
        # ZeRO holds master weights and Adam moments of the active layers only, half on each rank:
        # 2 of 6 layers plus embeddings, head and norm - not the whole model.
        active = rank["n_params"] - 4 * rank["layer_params"][0]
        for memory in rank["memory"]:
            assert active / 2 * 4 <= memory["master"] <= (active / 2 + 64) * 4  # + alignment padding
            assert memory["state"] >= 2 * memory["master"]
        assert rank["memory"][0]["master"] < 0.4 * rank["n_params"] * 4 / 2
        # The first period's flat buffers were freed when the optimizer was rebuilt for the second,
        # and the old ZeRO optimizer was gone before the new one allocated its buffers.
        assert rank["flat_buffers"] == (2, 1)
        assert rank["alive_at_build"] and set(rank["alive_at_build"]) == {0}


@pytest.mark.parametrize("stage", [2, 3])
def test_layerwise_sampling_resumes_from_a_sharded_checkpoint_mid_period(sharded_runs, stage):
    """The checkpoint is written after step 2 (period 0 runs steps 0-2): resuming rebuilds ZeRO with
    the checkpoint's layers before DeepSpeed loads its shards, and the lr the scheduler had left.
    The resumed run equals the uninterrupted one exactly (ZeRO-2: which equals DDP's)."""
    saved = read_client_state(sharded_runs.root / f"layerwise_resume/zero{stage}/first" / "last.ckpt")["callbacks"]["LayerwiseSampling"]
    assert saved["active"] == [2, 5] and [g["lr"] for g in saved["optimizer_hyperparameters"]] == pytest.approx([0.01 / 3] * 2)
    resumed = sharded_runs(f"layerwise_resume/zero{stage}/resumed")
    uninterrupted = sharded_runs("layerwise/ddp" if stage == 2 else "layerwise/zero3")
    for rank, expected in zip(resumed, uninterrupted):
        assert torch.equal(rank["params"], expected["params"])
        assert rank["lrs"] == expected["lrs"][2:]


def test_layer_sampling_over_lora_adapters_under_zero2_equals_ddp(sharded_runs):
    """peft LoRA on q/v: only the chosen layers' adapters train, the loss-credit policy learns from 4 periods, and the
    norms-only param group, which has nothing trainable under LoRA, is left out of DeepSpeed."""
    ddp, zero2 = sharded_runs("layerwise/ddplora"), sharded_runs("layerwise/zero2lora")
    for rank, expected in zip(zero2, ddp):
        assert rank["history"] == expected["history"] and len(rank["history"]) == 4
        assert torch.equal(rank["importance"], expected["importance"]) and rank["importance"].abs().sum() > 0
        assert torch.equal(rank["params"], expected["params"])
        assert [lr for step in rank["lrs"] for _, lr in step] == [lr for step in expected["lrs"] for wd, lr in step if wd == 0.1]
        for step in range(len(rank["snapshots"]) - 1):
            for layer in range(6):
                moved = not torch.equal(rank["snapshots"][step][layer], rank["snapshots"][step + 1][layer])
                assert moved == (layer in rank["history"][step // 3]), (step, layer)
        adapters_of_two_layers = 2 * 2 * (4 * 32 + 32 * 4)  # q and v, A and B
        assert all(memory["master"] == adapters_of_two_layers / 2 * 4 for memory in rank["memory"])  # half per rank


@pytest.mark.parametrize("stage", [2, 3])
def test_layerwise_sampling_under_zero_bf16_carries_the_fp32_master_of_layers_that_stay(sharded_runs, stage):
    """bf16 weights with fp32 master partitions: at the period change (step 3) the groups that stay
    active (layer 5, embeddings/head/norm) keep masters finer than bf16; layer 1's is built anew from
    its bf16 weights - which also shows the check can tell the two apart."""
    ranks = sharded_runs(f"layerwise/zero{stage}bf16")
    for rank in ranks:
        assert rank["history"] == [[2, 5], [1, 5]]
        at_change = rank["fp32_detail"][3]
        assert at_change == {(0, None): True, (0, 1): False, (0, 5): True, (1, None): True, (1, 1): False, (1, 5): True}
        assert not any(rank["fp32_detail"][0].values())  # step 0: every master is fresh from bf16
        assert torch.isfinite(rank["params"]).all()


def test_layerwise_sampling_names_every_deepspeed_setting_it_cannot_rebuild():
    callback = LayerwiseSampling("lisa", optimizer_state="offload")
    run = trainer(devices=1, strategy=CPUDeepSpeedStrategy(stage=0, offload_optimizer=True), max_steps=1, callbacks=[callback])
    with pytest.raises(MisconfigurationException, match="ZeRO stage 0.*; ZeRO-Offload.*; optimizer_state='offload'"):
        callback.setup(run, Classifier(), "fit")


@pytest.mark.parametrize(
    "strategy, case",
    [("zero2", case.name) for case in CASES if case.zero] + [("zero3", name) for name in ZERO3_AGREEMENT],
    ids=lambda value: value,
)
def test_ranks_with_different_data_take_the_same_decisions_under_zero(sharded_runs, strategy, case):
    rank0, rank1 = sharded_runs(f"agreement/{strategy}/{case}")
    assert rank0, "the case recorded no decision"
    assert_equal_decisions(rank0, rank1)
