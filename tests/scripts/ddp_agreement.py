"""2-process DDP (CPU, gloo): callbacks that decide something, with data that differs per rank.

Each rank trains on its own share of a dataset that alternates easy sequences (one token repeated)
and random ones; Lightning's DistributedSampler (no shuffling) gives rank 0 the easy and rank 1 the
random ones, so per-rank statistics differ as much as they can. Each rank saves its decisions.

Usage: python -m tests.scripts.ddp_agreement OUT_DIR {ist|upcycling}  (writes rank0.pt, rank1.pt)
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from tests.support.models import TinyLlama, TinyMoELM
from tests.support.training import trainer
from weightwise.callbacks import ExpertUpcycling, LayerwiseSampling


def easy_and_random(n: int, length: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        tokens = torch.full((length,), i % vocab) if i % 2 == 0 else torch.randint(0, vocab, (length,), generator=generator)
        items.append({"input_ids": tokens, "labels": tokens})
    return items


if __name__ == "__main__":
    out_dir, mode = Path(sys.argv[1]), sys.argv[2]
    seed_everything(0)
    if mode == "ist":  # 40 steps, a new period every 2
        sampling = LayerwiseSampling("ist", n_layers=2, interval=2)
        fit = trainer(devices=2, strategy="ddp", max_epochs=1, callbacks=[sampling])
        fit.fit(TinyLlama(), DataLoader(easy_and_random(160, 16, 64), batch_size=2))
        decisions = {"history": sampling.history, "importance": sampling.importance}
    else:  # utility over 3 optimizer steps of 2 micro-batches each, then 4 -> 8 experts
        upcycling = ExpertUpcycling(at_step=4, factor=2, selection="utility", utility_window=3)
        fit = trainer(devices=2, strategy="ddp", max_steps=5, accumulate_grad_batches=2, callbacks=[upcycling])
        fit.fit(TinyMoELM(top_k=2), DataLoader(easy_and_random(40, 24, 97), batch_size=2))
        decisions = {"utility": upcycling.utility.totals, "copies": upcycling.report.copies}
    torch.save(decisions, out_dir / f"rank{fit.global_rank}.pt")
