"""2-process DDP (CPU, gloo) with LayerwiseSampling; each rank saves its layers after every step.

Usage: python ddp_layerwise.py OUT_DIR  (writes rank0.pt, rank1.pt)
"""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "callbacks")]

import torch  # noqa: E402
from helpers import trainer  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402
from test_layerwise import Snapshot, TinyLlama, token_batches  # noqa: E402

from weightwise.callbacks import LayerwiseSampling  # noqa: E402

if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    seed_everything(0)
    sampling, snapshot = LayerwiseSampling("lisa", n_layers=2, interval=2), Snapshot()
    module = TinyLlama()
    ddp = trainer(devices=2, strategy="ddp", max_epochs=4, callbacks=[sampling, snapshot])
    ddp.fit(module, token_batches())
    torch.save({"snapshots": snapshot.params, "history": sampling.history}, out_dir / f"rank{ddp.global_rank}.pt")
