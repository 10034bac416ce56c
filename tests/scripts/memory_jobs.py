"""2-process per-rank memory jobs (CPU, gloo), run by ``tests.scripts.suite``: LISA under ZeRO, each
rank's live tensor bytes by kind (``benchmarks/memory/per_rank.py``), optionally with an old
behaviour of the ZeRO rebuild planted back."""

from benchmarks.memory.per_rank import measure
from tests.scripts.ddp_jobs import save

STEPS = 4
"""LISA (BAdam) switches layers at step 2 (interval 2): one rebuild mid-run; snapshots at the last step."""


def per_rank(out_dir: str, strategy: str, plant: str | None = None, method: str = "lisa") -> None:
    result = measure(strategy, method, STEPS, plant=plant, hidden=128, layers=4, snapshot_steps=(STEPS - 1,))
    save(out_dir, result["rank"], result)
