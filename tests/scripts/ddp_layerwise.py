"""2-process DDP (CPU, gloo) with LayerwiseSampling; each rank saves its layers after every step.

Usage: python -m tests.scripts.ddp_layerwise OUT_DIR  (writes rank0.pt, rank1.pt)
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

from tests.support.models import TinyLlama, token_batches
from tests.support.training import Snapshot, trainer
from weightwise.callbacks import LayerwiseSampling

if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    seed_everything(0)
    sampling, snapshot = LayerwiseSampling("lisa", n_layers=2, interval=2), Snapshot()
    module = TinyLlama()
    ddp = trainer(devices=2, strategy="ddp", max_epochs=4, callbacks=[sampling, snapshot])
    ddp.fit(module, token_batches())
    torch.save({"snapshots": snapshot.params, "history": sampling.history}, out_dir / f"rank{ddp.global_rank}.pt")
