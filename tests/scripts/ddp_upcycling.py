"""2-process DDP (CPU, gloo): ExpertUpcycling mid-fit; each rank saves its final parameters.

Usage: python ddp_upcycling.py OUT_DIR  (writes rank0.pt, rank1.pt)
"""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "callbacks"), str(TESTS / "moe")]

import torch  # noqa: E402
from helpers import flat_params, trainer  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402
from test_upcycling import TinyMoELM, loader  # noqa: E402

from weightwise.callbacks import ExpertUpcycling  # noqa: E402

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
