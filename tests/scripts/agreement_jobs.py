"""Every contract case (``tests/support/contracts.py``) on 2 processes with data that differs per
rank; each rank saves the decisions it took. Run by ``tests.scripts.suite``."""

from pathlib import Path

import torch

from tests.scripts.deepspeed_jobs import strategy_for
from tests.support.contracts import CASES_BY_NAME, fit_case


def decide(out_dir: str, case: str, strategy: str = "ddp") -> None:
    """Fit ``case`` on 2 processes under ``strategy`` (``"ddp"``, ``"zero2"``, ``"zero3"``)."""
    chosen = CASES_BY_NAME[case]
    engine = strategy_for(strategy)
    _, callbacks, recorder, run = fit_case(chosen, Path(out_dir), devices=2, strategy=engine)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(chosen.decisions(callbacks, recorder), Path(out_dir) / f"rank{run.global_rank}.pt")
