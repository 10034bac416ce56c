"""2-process DDP (CPU, gloo): ExpertUpcycling mid-fit; each rank saves its final parameters.

Usage: python -m tests.scripts.ddp_upcycling OUT_DIR  (writes rank0.pt, rank1.pt)
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

from tests.support.models import TinyMoELM
from tests.support.models import moe_loader as loader
from tests.support.training import flat_params, trainer
from weightwise.callbacks import ExpertUpcycling

if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    seed_everything(0)
    module = TinyMoELM(top_k=2)
    callback = ExpertUpcycling(at_step=2, factor=2, router_noise=1e-2)
    ddp = trainer(devices=2, strategy="ddp", max_epochs=3, callbacks=[callback])
    ddp.fit(module, loader())
    torch.save(
        {"params": flat_params(module), "num_experts": module.model.config.num_experts, "steps": ddp.global_step},
        out_dir / f"rank{ddp.global_rank}.pt",
    )
