"""LightningCLI entry point for the example configs in ``examples/configs``.

    python -m examples.cli fit --config examples/configs/bbc_reweight_prune.yaml
    python -m examples.cli fit --config examples/configs/bbc_reweight_prune.yaml --config examples/configs/gpu.yaml

Run from the repository root. Models and data modules are named by ``class_path``
(``examples.bbc_news.*``, ``examples.language_modeling.*``); callbacks by their
``weightwise.callbacks.*`` path.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
