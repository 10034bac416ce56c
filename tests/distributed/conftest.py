"""The session fixtures of the 2-process runs: every job of a group runs in one launch, once per session.

Tests ask for a group's results (``ddp_runs``, ``sharded_runs``) and read their job's output
directory; the jobs are listed in ``tests/support/distributed.py``.
"""

import pytest

from tests.support.distributed import DDP_JOBS, SHARDED_JOBS, Runs, launch
from tests.support.models import tiny_moe


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory) -> Runs:
    return launch(tmp_path_factory.mktemp("ddp"), DDP_JOBS)


@pytest.fixture(scope="session")
def sharded_runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("deepspeed")
    tiny_moe("mixtral", num_experts=4, top_k=2).save_pretrained(root / "moe" / "E")
    tiny_moe("mixtral", num_experts=4, top_k=1).save_pretrained(root / "moe" / "E_top1")  # duplicates keep its function
    from tests.scripts.dense_jobs import DenseLM  # the dense model the between-fits route starts from

    DenseLM().model.save_pretrained(root / "dense" / "between" / "dense")
    return launch(root, SHARDED_JOBS)
