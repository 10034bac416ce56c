"""A saved transformers MoE model trained for a few steps under DeepSpeed ZeRO (2 processes, CPU, gloo).

Usage: python -m tests.scripts.deepspeed_moe OUT_DIR STAGE MODEL_DIR STEPS
(writes the sharded checkpoint OUT_DIR/last.ckpt and OUT_DIR/losses.pt from rank 0)
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick CUDA on a GPU machine


import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from tests.support.strategies import CPUDeepSpeedStrategy
from tests.support.training import trainer


class PretrainedLM(pl.LightningModule):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


if __name__ == "__main__":
    out_dir, stage, model_dir, steps = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    pl.seed_everything(0)
    module = PretrainedLM(model_dir)
    tokens = torch.randint(0, module.model.config.vocab_size, (8 * steps, 12), generator=torch.Generator().manual_seed(0))
    fit = trainer(
        devices=2, strategy=CPUDeepSpeedStrategy(stage=stage), max_steps=steps, enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=out_dir, save_last=True)],
    )
    fit.fit(module, DataLoader(tokens, batch_size=4))
    if fit.global_rank == 0:
        torch.save(module.losses, out_dir / "losses.pt")
