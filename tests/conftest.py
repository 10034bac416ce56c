import os
import sys

# Tests never reach a network: offline W&B and HF hub, and the helpers importable as a module.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "moe"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "callbacks"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skip them cleanly (and visibly) on machines without it."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
