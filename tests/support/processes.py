"""Running the multi-process programs of ``tests/scripts`` (real 2-process gloo runs on CPU).

The 2-process tests collect their jobs and run them in one launch (``tests.scripts.suite``): a
process start-up (imports of torch, Lightning, transformers) costs more than most jobs' fits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def run_suite(jobs: list[tuple[str, dict[str, Any]]], workdir: Path, timeout: int = 900) -> None:
    """Run ``jobs`` (``("module:function", kwargs)`` under ``tests.scripts``) in one 2-process launch;
    fail with the launch's output."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "jobs.json"
    spec.write_text(json.dumps([{"job": job, "kwargs": kwargs} for job, kwargs in jobs]))
    done = subprocess.run(
        [sys.executable, "-m", "tests.scripts.suite", str(spec)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def ranks(out_dir: Path) -> list[dict]:
    """What each of the 2 ranks of a job saved (``OUT_DIR/rank{r}.pt``)."""
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
