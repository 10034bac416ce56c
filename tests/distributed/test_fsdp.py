"""Lightning's FSDPStrategy (PyTorch FSDP), real 2-process runs on CPU (gloo).

The strategy is Lightning's own with its CUDA-only device plumbing bridged
(``tests.support.strategies.CPUFSDPStrategy``); FSDP's sharding and state dicts are PyTorch's. The
jobs (``tests.scripts.deepspeed_jobs.fit`` with ``name="fsdp"``, the agreement cases) run in the
sharded group's launch (``tests/support/distributed.py``) and are compared with its DDP run.
"""

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tests.support.distributed import FIT_EPOCHS, FSDP_AGREEMENT, assert_equal_decisions, assert_same_training
from tests.support.models import Classifier, TinyLlama
from tests.support.strategies import CPUFSDPStrategy
from tests.support.training import trainer
from weightwise.callbacks import DenseUpcycling, ExpertUpcycling

pytestmark = pytest.mark.slow


def test_fsdp_trains_exactly_like_ddp_with_reweighting_pruning_and_the_report(sharded_runs):
    ranks, ddp = sharded_runs("fit/fsdp"), sharded_runs("fit/ddp")
    assert_same_training(ranks, ddp, range(FIT_EPOCHS))
    for epoch in range(FIT_EPOCHS):  # the sampler sharded itself
        assert not set(ranks[0]["ids"][epoch]) & set(ranks[1]["ids"][epoch])
    assert ranks[0]["ledger"]["samples_visited"] < ranks[0]["ledger"]["samples_full"]
    assert ranks[0]["report"] == ranks[1]["report"] == ddp[0]["report"] and len(ranks[0]["report"]) == 6


def test_fsdp_checkpoint_carries_callback_state_and_resumes_exactly(sharded_runs):
    directory = sharded_runs.root / "sharded/fsdp/first" / "last.ckpt"
    assert directory.is_dir()  # a sharded checkpoint: torch.distributed.checkpoint files and Lightning's meta.pt
    checkpoint = torch.load(directory / "meta.pt", weights_only=False)
    assert {"LossReweighting", "DataPruning"} <= set(checkpoint["callbacks"])
    assert checkpoint["weightwise"]["scores"]["count"].sum() > 0
    assert_same_training(sharded_runs("sharded/fsdp/resumed"), sharded_runs("fit/ddp"), range(1, FIT_EPOCHS))


def test_fsdp_mid_epoch_checkpoint_resumes_the_pruned_epoch_where_it_stopped(sharded_runs):
    first = sharded_runs("mid_epoch/fsdp/first")
    assert [len(first[0]["ids"][e]) for e in sorted(first[0]["ids"])] == [20, 5]
    for rank, expected in zip(sharded_runs("mid_epoch/fsdp/resumed"), sharded_runs("fit/ddp")):
        assert torch.allclose(rank["params"], expected["params"], atol=1e-6)
        assert sorted(rank["ids"]) == [1] and rank["ids"][1] == expected["ids"][1][5:]


@pytest.mark.parametrize("case", FSDP_AGREEMENT)
def test_ranks_with_different_data_take_the_same_decisions_under_fsdp(sharded_runs, case):
    rank0, rank1 = sharded_runs(f"agreement/fsdp/{case}")
    assert rank0, "the case recorded no decision"
    assert_equal_decisions(rank0, rank1)


@pytest.mark.parametrize("callback", [ExpertUpcycling(at_step=1), DenseUpcycling(at_step=1)], ids=["experts", "dense"])
def test_upcycling_refuses_fsdp_naming_the_between_fits_route_and_ddp(callback):
    # LayerwiseSampling runs under FSDP (tests/distributed/test_layers_fsdp2.py); growing experts mid-fit does not
    run = trainer(devices=1, strategy=CPUFSDPStrategy(), max_steps=1, callbacks=[callback])
    with pytest.raises(MisconfigurationException, match="cannot run under FSDP.*`weightwise upcycle.*deepspeed_stage_2.*strategy='ddp'"):
        callback.on_fit_start(run, TinyLlama(2) if isinstance(callback, DenseUpcycling) else Classifier())
