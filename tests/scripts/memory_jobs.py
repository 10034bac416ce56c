"""2-process per-rank memory jobs (CPU, gloo), run by ``tests.scripts.suite``: full training and LISA
under ZeRO and FSDP2 (``ModelParallelStrategy``), each rank's live tensor bytes by kind
(``benchmarks/memory/per_rank.py``), optionally with a mistake planted (an old behaviour of the ZeRO
rebuild; frozen layers keeping their optimizer state)."""

from benchmarks.memory.per_rank import measure
from tests.scripts.ddp_jobs import save

STEPS = 4
"""LISA (BAdam) switches layers at step 2 (interval 2): one rebuild mid-run; snapshots at the last step."""
LAYERS = 4


def per_rank(out_dir: str, strategy: str, plant: str | None = None, method: str = "lisa") -> None:
    result = measure(strategy, method, STEPS, plant=plant, hidden=128, layers=LAYERS, snapshot_steps=(STEPS - 1,))
    save(out_dir, result["rank"], result)
