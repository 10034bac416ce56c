"""A real 2-process fit (CPU, gloo) under DDP or Lightning's DeepSpeedStrategy ZeRO-1/2/3.

LossReweighting + DataPruning (InfoBatch) + SampleReport + checkpointing; each rank saves the full
parameters, its score store, the sample ids it trained on, the pruning ledger and the report rows.

Usage: python -m tests.scripts.deepspeed_fit OUT_DIR ddp|zero1|zero2|zero3 EPOCHS [RESUME_FROM] [STOP_AT_STEP]
(writes rank0.pt, rank1.pt and the checkpoint OUT_DIR/last.ckpt - a directory under DeepSpeed;
with STOP_AT_STEP the run checkpoints after every step and stops there, mid-epoch; "-" for no RESUME_FROM).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick CUDA on a GPU machine


import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.support.models import Classifier, indexed_loader
from tests.support.strategies import CPUDeepSpeedStrategy
from tests.support.training import full_parameters, trainer
from weightwise.callbacks import DataPruning, LossReweighting, SampleReport
from weightwise.samplers import InfoBatchSampler

N_SAMPLES, LOCAL_BATCH = 40, 5


class SampleIds(Callback):
    def __init__(self) -> None:
        self.ids: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.setdefault(trainer.current_epoch, []).extend(batch.sample_id.tolist())


if __name__ == "__main__":
    out_dir, name, epochs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    resume_from = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    stop_at_step = int(sys.argv[5]) if len(sys.argv) > 5 else -1
    seed_everything(0)
    strategy = "ddp" if name == "ddp" else CPUDeepSpeedStrategy(stage=int(name.removeprefix("zero")))
    reweighting, pruning, ids, report = LossReweighting("linupper", warmup_steps=0), DataPruning(), SampleIds(), SampleReport(k=3)
    fit = trainer(
        devices=2,
        strategy=strategy,
        max_epochs=epochs,
        callbacks=[reweighting, pruning, ids, report,
                   ModelCheckpoint(dirpath=out_dir, save_last=True, every_n_train_steps=1 if stop_at_step > 0 else None)],
        max_steps=stop_at_step,
        default_root_dir=out_dir,
        enable_checkpointing=True,
        use_distributed_sampler=False,  # the pruning sampler shards itself
    )
    model = Classifier(lr=0.05, optimizer="adamw")
    sampler = InfoBatchSampler(N_SAMPLES, prune_ratio=0.5, anneal=1.0)  # 2 epochs: epoch 1 prunes too
    fit.fit(model, indexed_loader(N_SAMPLES, LOCAL_BATCH, sampler=sampler), ckpt_path=resume_from)
    torch.save(
        {
            "params": full_parameters(model),
            "scores": pruning.reducer.scores.state_dict(),
            "ids": ids.ids,
            "ledger": pruning.ledger,
            "report": report.rows,
        },
        out_dir / f"rank{fit.global_rank}.pt",
    )
