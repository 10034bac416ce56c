"""Test-wide settings: no network, CUDA-only tests skipped visibly without CUDA."""

import os

import pytest
import torch

# Tests never reach a network: offline W&B and HF hub.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# One thread per process: the tests' tensors are tiny, and the 2-process runs would otherwise put
# four threads on two cores - each op then waits for a core (measured: 25x slower fits).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skip them cleanly (and visibly) on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
