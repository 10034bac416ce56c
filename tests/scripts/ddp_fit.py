"""A real 2-process DDP fit (CPU, gloo) with LossReweighting; each rank saves what it ended with.

Usage: python -m tests.scripts.ddp_fit OUT_DIR STRATEGY [EPOCHS [RESUME_FROM]]  (writes rank0.pt, rank1.pt, last.ckpt)
Lightning's subprocess launcher re-runs this script for rank 1.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.support.models import Classifier, indexed_loader
from tests.support.training import flat_params, trainer
from weightwise.callbacks import LossReweighting

N_SAMPLES, LOCAL_BATCH, EPOCHS = 48, 6, 2

if __name__ == "__main__":
    out_dir, strategy = Path(sys.argv[1]), sys.argv[2]
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else EPOCHS
    resume_from = sys.argv[4] if len(sys.argv) > 4 else None
    seed_everything(0)
    model = Classifier(lr=0.5)
    callback = LossReweighting(strategy, warmup_steps=0)
    checkpointing = ModelCheckpoint(dirpath=out_dir, save_last=True)
    ddp = trainer(
        devices=2, strategy="ddp", max_epochs=epochs, callbacks=[callback, checkpointing], enable_checkpointing=True
    )
    # Lightning shards the loader with DistributedSampler(shuffle=True, seed=0); the test replays its order.
    ddp.fit(model, indexed_loader(N_SAMPLES, LOCAL_BATCH), ckpt_path=resume_from)
    torch.save(
        {"params": flat_params(model), "scores": callback.reducer.scores.state_dict()},
        out_dir / f"rank{ddp.global_rank}.pt",
    )
