"""2-process DDP (or ZeRO, FSDP2: ``strategy``, see ``sharded_language_jobs``) jobs of ComputeBudget (CPU,
gloo), run by ``tests.scripts.suite``; each rank saves what it spent."""

import lightning.pytorch as pl
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from tests.scripts.ddp_jobs import save
from tests.scripts.sharded_language_jobs import for_strategy, layout, strategy_for, whole_parameters
from tests.support.models import TinyLlama, real_bytes
from tests.support.training import trainer
from weightwise.compute import ComputeBudget

LENGTHS = (16, 8)
"""Sequence length of each rank's batches (2 rows each): the ranks spend different FLOPs and tokens a step."""


class RankLengths(pl.LightningDataModule):
    """Different data per rank: rank 0 reads real text in rows of 16 tokens, rank 1 other text in rows of 8."""

    def train_dataloader(self):
        rank = self.trainer.global_rank
        length = LENGTHS[rank]
        text = (real_bytes(4096)[rank * 2048 :] % 64)[: 16 * length].view(16, length)
        return DataLoader([{"input_ids": row} for row in text], batch_size=2)


def budget(out_dir: str, tokens: int, strategy: str = "ddp") -> None:
    """Train to a token budget; each rank also counts its own step's forward with FlopCounterMode."""
    seed_everything(0)
    model, callback = for_strategy(TinyLlama)(layers=2), ComputeBudget(tokens=tokens)
    fit = trainer(devices=2, strategy=strategy_for(strategy), max_epochs=-1, callbacks=[callback], use_distributed_sampler=False)
    fit.fit(model, datamodule=RankLengths())
    held = layout(model)  # before the forward below: FSDP2 keeps the root unsharded after a forward
    x = torch.zeros(2, LENGTHS[fit.global_rank], dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model(input_ids=x, labels=x)
    result = {
        "spent": callback.spent, "step": fit.global_step, "forward": counter.get_total_flops(),
        "params": whole_parameters(model), "layout": held,
    }  # fmt: skip
    save(out_dir, fit.global_rank, result)
