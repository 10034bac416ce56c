"""ComputeBudget under 2-process DDP with different data per rank: one stop step, one spent amount."""

import pytest
import torch

from tests.scripts.compute_jobs import LENGTHS
from tests.support.distributed import COMPUTE_BUDGET_TOKENS

pytestmark = pytest.mark.slow

ROWS = 2


def test_compute_budget_ranks_stop_at_the_same_step_and_agree_on_the_sum(ddp_runs):
    step_tokens = ROWS * sum(LENGTHS)  # both ranks' batches
    assert COMPUTE_BUDGET_TOKENS == int(3.5 * step_tokens)
    first, second = ddp_runs("compute_budget")
    assert first["step"] == second["step"] == 4  # 3 steps spend 3.5 x less a half step; the 4th reaches it
    assert first["spent"] == second["spent"]
    spent = first["spent"]
    assert spent.tokens == spent.backward_tokens == 4 * step_tokens
    forward = first["forward"] + second["forward"]  # the ranks' forwards differ: the sum is over ranks
    assert first["forward"] != second["forward"]
    assert spent.forward_flops == 4 * forward and spent.backward_flops == 2 * spent.forward_flops
    assert torch.equal(first["params"], second["params"])
