"""Dense upcycling on 2 processes (gloo): DenseUpcycling under DDP (every rank makes the same MoE and
trains it in lock-step), and the between-fits route under ZeRO-3 that its DeepSpeed error names.
The jobs run in the shared sharded launch (tests/support/distributed.py)."""

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


def test_dense_to_moe_between_two_zero3_fits(sharded_runs):
    """`weightwise upcycle --from-dense` between fits, end to end under ZeRO-3 (sharded parameters):
    train the dense model, consolidate the shards, save_pretrained, upcycle, train the MoE."""
    from transformers import AutoModelForCausalLM

    root = sharded_runs.root / "dense" / "between"
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    dense, trained, moe = (AutoModelForCausalLM.from_pretrained(root / name).eval() for name in ("dense", "dense_trained", "moe"))
    with torch.no_grad():
        before, after, grown = (m(input_ids=ids).logits for m in (dense, trained, moe))
    assert not torch.allclose(after, before)  # phase 1 did train
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4
    torch.testing.assert_close(grown, after, rtol=0, atol=1e-5)  # copies: the trained dense function
    losses = torch.load(root / "phase2" / "losses.pt")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
