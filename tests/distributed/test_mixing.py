"""Domain mixing on 2 DDP processes (gloo): the ranks draw different data and decide the same weights;
a resumed run continues exactly. The jobs (tests/scripts/mixing_jobs.py) run in the shared DDP launch."""

import pytest
import torch

pytestmark = pytest.mark.slow

@pytest.mark.parametrize("kind", ["mapped", "stream"])
def test_ranks_draw_different_data_and_decide_the_same_weights(ddp_runs, kind):
    zero, one = ddp_runs(f"mixing/{kind}")
    assert len(zero["weights"]) == 8 and all(torch.equal(a, b) for a, b in zip(zero["weights"], one["weights"]))
    assert len({tuple(w.tolist()) for w in zero["weights"]}) > 2  # the mixture moved
    assert zero["batches"] != one["batches"]
    first_pass = [set(sum(r["batches"][:3], [])) for r in (zero, one)]
    assert first_pass[0].isdisjoint(first_pass[1])  # disjoint shares
    assert torch.equal(zero["ledger"]["tokens"], one["ledger"]["tokens"])  # global counts
    assert torch.equal(zero["params"], one["params"])  # DDP kept the replicas equal


@pytest.mark.parametrize("kind", ["mapped", "stream"])
def test_a_resumed_ddp_run_continues_exactly(ddp_runs, kind):
    assert_continues(ddp_runs(f"mixing/{kind}"), ddp_runs(f"mixing/{kind}_resumed"))


def assert_continues(straight: list[dict], resumed: list[dict], atol: float = 0.0) -> None:
    """Each rank of the run resumed after step 3 drew the straight run's batches and ended with its weights,
    rewards and (to ``atol``) parameters."""
    for whole, rank in zip(straight, resumed):
        assert rank["batches"] == whole["batches"][3:]
        assert torch.equal(rank["weights"][-1], whole["weights"][-1]) and torch.equal(rank["rewards"], whole["rewards"])
        torch.testing.assert_close(rank["params"], whole["params"], rtol=0, atol=atol)
