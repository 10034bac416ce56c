"""LightningCLI entry point for the example configs in ``examples/configs``.

    python examples/cli.py fit --config examples/configs/bbc_reweight_prune.yaml
    python examples/cli.py fit --config examples/configs/bbc_reweight_prune.yaml --config examples/configs/gpu.yaml

Models and data modules are named by ``class_path`` (``bbc_news.*``, ``language_modeling.*``, which
live next to this file); callbacks by their ``weightwise.callbacks.*`` path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning.pytorch.cli import LightningCLI  # noqa: E402


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
