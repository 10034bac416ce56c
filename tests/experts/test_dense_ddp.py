"""DenseUpcycling under 2-process DDP (gloo): every rank makes the same MoE and trains it in lock-step."""

import pytest
import torch

from tests.support.distributed import launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # Drop-Upcycling: random routers *and* re-initialised units, which every rank must draw alike
    return launch(tmp_path_factory.mktemp("dense"), [("dense_jobs:dense_upcycling", {"out_dir": "drop", "method": "drop"})])


def test_ranks_make_the_same_moe_and_train_it_in_lock_step(runs):
    rank0, rank1 = runs("drop")
    assert rank0["class"] == rank1["class"] == "MixtralForCausalLM"
    assert rank0["steps"] == 6  # 2 epochs of 3 steps (6 batches over 2 ranks), surgery at step 2
    # same routers and re-initialised units on both ranks, and DDP re-wrapped: gradients still averaged
    assert torch.equal(rank0["params"], rank1["params"])
    assert torch.equal(rank0["expert_state"], rank1["expert_state"]) and rank0["expert_state"].abs().sum() > 0
    assert rank0["losses"]["before"] != rank1["losses"]["before"]  # the ranks did see different data
