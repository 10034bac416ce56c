"""Two gloo processes gather tensors of *different* lengths with weightwise.distributed.

Usage: python -m tests.scripts.gather OUT_DIR  (writes rank0.pt, rank1.pt)
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from weightwise.core import collectives as distributed


def worker(rank: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    n = 3 if rank == 0 else 5  # unequal on purpose
    losses = torch.arange(n, dtype=torch.float32) + 10 * rank
    ids = torch.arange(n) + 100 * rank
    (g_losses, g_ids), local = distributed.all_gather_variable(losses, ids)
    torch.save({"losses": g_losses, "ids": g_ids, "local": (local.start, local.stop)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
