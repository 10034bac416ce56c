"""Running the multi-process programs of ``tests/scripts`` (real 2-process gloo runs on CPU)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(name: str, *args: object, timeout: int = 300) -> None:
    """Run ``tests/scripts/<name>.py`` as a module from the repository root; fail with its output."""
    command = [sys.executable, "-m", f"tests.scripts.{name}", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def run_ranks(name: str, out_dir: Path, *args: object) -> list[dict]:
    """Run a 2-process script that writes ``OUT_DIR/rank{r}.pt``; what each rank saved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_script(name, out_dir, *args)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
