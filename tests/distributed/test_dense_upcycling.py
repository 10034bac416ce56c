"""Dense upcycling on 2 processes (gloo): DenseUpcycling under DDP (every rank makes the same MoE and
trains it in lock-step). The between-fits route its FSDP2/ZeRO-3 refusal names is tested in
test_upcycle_between_fits.py. The jobs run in the shared sharded launch (tests/support/distributed.py)."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_ranks_make_the_same_moe_and_train_it_in_lock_step(sharded_runs):
    rank0, rank1 = sharded_runs("dense/drop")
    assert rank0["class"] == rank1["class"] == "MixtralForCausalLM"
    assert rank0["steps"] == 6  # 2 epochs of 3 steps (6 batches over 2 ranks), surgery at step 2
    # same routers and re-initialised units on both ranks, and DDP re-wrapped: gradients still averaged
    assert torch.equal(rank0["params"], rank1["params"])
    assert torch.equal(rank0["expert_state"], rank1["expert_state"]) and rank0["expert_state"].abs().sum() > 0
    assert rank0["losses"]["before"] != rank1["losses"]["before"]  # the ranks did see different data

