"""TokenWeighting (DFT), SelectiveTokens (Rho-1), ComputeBudget, DomainMixing and StreamLoader under DeepSpeed
ZeRO-2/3 and FSDP2 (ModelParallelStrategy, ``fully_shard`` per decoder layer and the root): 2 CPU processes (gloo),
different data per rank. The sharded runs (``tests/scripts/sharded_language_jobs.py``, in the sharded group's
launch) are the DDP tests' jobs under another strategy; each is compared with the DDP group's run of the same job.

Tolerances: the ranks' decisions (selected tokens, mixture weights, stop step, FLOPs and tokens spent, the batches
drawn) must be equal exactly; parameters are allclose, since ZeRO and FSDP2 reduce gradients in another order
than DDP's all-reduce (fp32 rounding). With SGD (token weighting, mixing) that stays below 1e-7 (measured 4e-9);
AdamW (ComputeBudget, streams: lr 1e-2) divides each update by sqrt(v), so a last-bit difference in a near-zero
gradient element moves that element by up to ~lr x 1e-4 a step (measured 2e-6 after 7 ZeRO-3 steps): 1e-5.
"""

import pytest
import torch

from tests.distributed.test_mixing import assert_continues
from tests.distributed.test_token_ddp import assert_global_top_k
from tests.scripts.sharded_language_jobs import (
    BUDGET_TOKENS,
    MIXING_RUNS,
    STRATEGIES,
    STREAM_SAVE_AT,
    TOKEN_RUNS,
)
from tests.support.distributed import COMPUTE_BUDGET_TOKENS

pytestmark = pytest.mark.slow

SGD_ATOL, ADAMW_ATOL = 1e-7, 1e-5
EXACT_TOKEN_RUNS = [(m, s) for m, s in TOKEN_RUNS if not s.endswith("-lightning")]
LAYOUT = {"zero2": "whole", "zero3": "partitioned", "fsdp2": "dtensor"}
"""How each rank holds the parameters after the fit (``sharded_language_jobs.layout``): ZeRO-2 partitions gradients
and optimizer state only; ZeRO-3 partitions every parameter (persistence threshold 0), FSDP2 makes them DTensor shards."""


def assert_sharded(ranks: list[dict], strategy: str) -> None:
    assert [rank["layout"] for rank in ranks] == [LAYOUT[strategy]] * 2


@pytest.mark.parametrize(("method", "strategy"), EXACT_TOKEN_RUNS)
def test_token_weighting_decides_and_trains_like_ddp(ddp_runs, sharded_runs, method, strategy):
    ranks, ddp = sharded_runs(f"language/tokens/{method}/{strategy}"), ddp_runs(f"tokens/{method}")
    assert_sharded(ranks, strategy)
    if method == "rho1":
        assert_global_top_k(ranks)  # the global top k% of both ranks' excess losses, every micro-batch
        for rank, reference in zip(ranks, ddp):
            assert [s["selected"].sum().item() for s in rank["seen"]] == [s["selected"].sum().item() for s in reference["seen"]]
    assert ranks[0]["ledger"] == ranks[1]["ledger"] == ddp[0]["ledger"]  # global token counts, steps, reference FLOPs
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    torch.testing.assert_close(ranks[0]["params"], ddp[0]["params"], rtol=0, atol=SGD_ATOL)


def test_lightning_deepspeed_divides_an_accumulated_loss_twice(ddp_runs, sharded_runs):
    """Why the ZeRO runs use ``DeepSpeedLossDividedOnce`` (weightwise.integrations.lightning): Lightning's DeepSpeed precision as it is trains DFT with
    accumulate_grad_batches=2 at half DDP's update (SGD: the update is linear in the gradient; the second step's
    gradient, taken at slightly other parameters, makes the ratio 0.5 to ~1e-5, measured 0.49999)."""
    from tests.support.models import TokenLossLM
    from tests.support.training import flat_params

    start = flat_params(TokenLossLM())
    ddp = ddp_runs("tokens/dft")[0]["params"] - start
    as_is = sharded_runs("language/tokens/dft/zero2-lightning")[0]["params"] - start
    assert (as_is @ ddp / (ddp @ ddp)).item() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compute_budget_counts_what_ddp_counts_and_stops_at_its_step(ddp_runs, sharded_runs, strategy):
    assert BUDGET_TOKENS == COMPUTE_BUDGET_TOKENS
    ranks, ddp = sharded_runs(f"language/compute/{strategy}"), ddp_runs("compute_budget")
    assert_sharded(ranks, strategy)
    for rank, reference in zip(ranks, ddp):
        assert rank["step"] == reference["step"] == 4
        assert rank["spent"] == reference["spent"]  # FLOPs (forward, backward, by source) and tokens, summed over ranks
        assert rank["forward"] == reference["forward"]  # the gathered parameters' FLOPs, not a shard's
    assert ranks[0]["forward"] != ranks[1]["forward"]  # the ranks' data differ
    assert ranks[0]["spent"].backward_flops == 2 * ranks[0]["spent"].forward_flops > 0
    torch.testing.assert_close(ranks[0]["params"], ddp[0]["params"], rtol=0, atol=ADAMW_ATOL)


@pytest.mark.parametrize(("kind", "strategy"), MIXING_RUNS)
def test_domain_mixing_ranks_agree_and_resume_where_ddp_goes(ddp_runs, sharded_runs, kind, strategy):
    first, resumed = (sharded_runs(f"language/mixing/{kind}/{strategy}/{run}") for run in ("first", "resumed"))
    straight = ddp_runs(f"mixing/{kind}")
    assert_sharded(first, strategy)
    assert_sharded(resumed, strategy)
    for rank in (0, 1):  # the first fit drew DDP's batches and decided its weights, then resumed exactly
        assert first[rank]["batches"] == straight[rank]["batches"][:3]
        assert all(torch.equal(a, b) for a, b in zip(first[rank]["weights"] + resumed[rank]["weights"], straight[rank]["weights"]))
    assert first[0]["batches"] != first[1]["batches"]
    assert all(torch.equal(a, b) for a, b in zip(resumed[0]["weights"], resumed[1]["weights"]))
    assert torch.equal(resumed[0]["ledger"]["tokens"], resumed[1]["ledger"]["tokens"])
    assert torch.equal(resumed[0]["ledger"]["tokens"], straight[0]["ledger"]["tokens"])
    assert_continues(straight, resumed, atol=SGD_ATOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_resumed_sharded_stream_continues_where_ddp_goes(ddp_runs, sharded_runs, strategy):
    first, resumed = (sharded_runs(f"language/stream/{strategy}/{run}") for run in ("first", "resumed"))
    straight = ddp_runs("stream_straight")
    assert_sharded(first, strategy)
    assert_sharded(resumed, strategy)
    for rank in (0, 1):
        assert len(first[rank]["seen"]) == STREAM_SAVE_AT
        assert torch.equal(torch.cat([first[rank]["seen"], resumed[rank]["seen"]]), straight[rank]["seen"])
    assert not torch.equal(straight[0]["seen"], straight[1]["seen"])
    assert torch.equal(resumed[0]["params"], resumed[1]["params"])
    torch.testing.assert_close(resumed[0]["params"], straight[0]["params"], rtol=0, atol=ADAMW_ATOL)
