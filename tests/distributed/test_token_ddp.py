"""Token weighting under 2-process DDP with gradient accumulation: Rho-1's selected set is the global
batch's top k%, every rank agrees, and both methods train like one process fed the global batches."""

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader, DistributedSampler

from tests.scripts import token_jobs
from tests.support.models import TokenLossLM, padded_token_batches
from tests.support.training import flat_params, trainer

pytestmark = pytest.mark.slow

METHODS = ("rho1", "dft")


def single_process(method: str) -> tuple[torch.Tensor, dict]:
    """One process fed each micro-batch's global batch - rank 0's rows, then rank 1's, in the order of
    Lightning's DistributedSampler(shuffle=True, seed=0) - with the same accumulation."""
    rows = list(padded_token_batches(n=token_jobs.ROWS, batch_size=1).dataset)
    shards = [list(DistributedSampler(rows, num_replicas=2, rank=rank, shuffle=True, seed=0)) for rank in (0, 1)]
    size = token_jobs.ROWS_PER_RANK
    batches = [shards[0][start : start + size] + shards[1][start : start + size] for start in range(0, len(shards[0]), size)]
    seed_everything(0)
    module, callback = TokenLossLM(), token_jobs.make_callback(method)
    fit = trainer(max_steps=token_jobs.STEPS, accumulate_grad_batches=token_jobs.ACCUMULATE, callbacks=[callback])
    fit.fit(module, DataLoader(rows, batch_sampler=batches))
    return flat_params(module), dict(callback.ledger)


def test_rho1_selects_the_global_top_k_and_the_ranks_agree(ddp_runs):
    assert_global_top_k(ddp_runs("tokens/rho1"))


def assert_global_top_k(ranks: list[dict]) -> None:
    """Each micro-batch's selection is the global top k% of both ranks' excess losses; the ledgers agree."""
    micro_batches = token_jobs.STEPS * token_jobs.ACCUMULATE
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == micro_batches
    total = 0
    for first, second in zip(ranks[0]["seen"], ranks[1]["seen"]):
        scores = torch.cat([first["scores"][first["mask"]], second["scores"][second["mask"]]])
        selected = torch.cat([first["selected"][first["mask"]], second["selected"][second["mask"]]])
        k = int(0.6 * scores.numel())
        expected = torch.zeros_like(selected)
        expected[torch.topk(scores, k).indices] = True
        assert torch.equal(selected, expected)  # the global top k%, not each rank's
        assert first["mask"].sum() != second["mask"].sum()  # the ranks held different token counts
        assert not (first["selected"] & ~first["mask"]).any() and not (second["selected"] & ~second["mask"]).any()
        total += k
    assert ranks[0]["ledger"] == ranks[1]["ledger"]
    assert ranks[0]["ledger"]["tokens_selected"] == total


@pytest.mark.parametrize("method", METHODS)
def test_ddp_with_accumulation_trains_like_one_process_on_the_global_batches(ddp_runs, method):
    ranks = ddp_runs(f"tokens/{method}")
    params, ledger = single_process(method)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    torch.testing.assert_close(ranks[0]["params"], params, rtol=0, atol=1e-6)
    for key in ("steps", "tokens_valid", "tokens_selected"):
        assert ranks[0]["ledger"][key] == ledger[key], key
