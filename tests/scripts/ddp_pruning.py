"""2-process DDP (CPU, gloo) with InfoBatchSampler + DataPruning; each rank saves what it trained on.

Usage: python -m tests.scripts.ddp_pruning OUT_DIR  (writes rank0.pt, rank1.pt)
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback

from tests.support.models import Classifier, indexed_loader
from tests.support.training import trainer
from weightwise.callbacks import DataPruning
from weightwise.samplers import InfoBatchSampler

N_SAMPLES, EPOCHS = 50, 4


class Recorder(Callback):
    def __init__(self):
        self.ids, self.plans = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.setdefault(trainer.current_epoch, []).extend(batch.sample_id.tolist())

    def on_train_epoch_end(self, trainer, pl_module):
        self.plans[trainer.current_epoch] = trainer.train_dataloader.sampler.plan.indices.tolist()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    seed_everything(0)
    recorder, pruning = Recorder(), DataPruning()
    ddp = trainer(
        devices=2, strategy="ddp", max_epochs=EPOCHS, callbacks=[pruning, recorder], use_distributed_sampler=False
    )
    ddp.fit(Classifier(lr=0.5), indexed_loader(N_SAMPLES, 5, sampler=InfoBatchSampler(N_SAMPLES, prune_ratio=0.5)))
    torch.save(
        {"ids": recorder.ids, "plans": recorder.plans, "ledger": pruning.ledger, "scores": pruning.reducer.scores.state_dict()},
        out_dir / f"rank{ddp.global_rank}.pt",
    )
