"""A real 2-process fit (CPU, gloo) under DDP or Lightning's DeepSpeedStrategy ZeRO-1/2/3.

LossReweighting + DataPruning (InfoBatch) + SampleReport + checkpointing; each rank saves the full
parameters, its score store, the sample ids it trained on, the pruning ledger and the report rows.

Usage: python deepspeed_fit.py OUT_DIR ddp|zero1|zero2|zero3 EPOCHS [RESUME_FROM] [STOP_AT_STEP]
(writes rank0.pt, rank1.pt and the checkpoint OUT_DIR/last.ckpt - a directory under DeepSpeed;
with STOP_AT_STEP the run checkpoints after every step and stops there, mid-epoch; "-" for no RESUME_FROM).
"""

import contextlib
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick CUDA on a GPU machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

import torch  # noqa: E402
from helpers import Classifier, CPUDeepSpeedStrategy, flat_params, indexed_loader, trainer  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from weightwise.callbacks import DataPruning, LossReweighting, SampleReport  # noqa: E402
from weightwise.samplers import InfoBatchSampler  # noqa: E402

N_SAMPLES, LOCAL_BATCH = 40, 5


class SampleIds(Callback):
    def __init__(self) -> None:
        self.ids: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.setdefault(trainer.current_epoch, []).extend(batch.sample_id.tolist())


def gathered(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Whole parameters inside the block: under ZeRO-3 each rank holds shards, so gather them."""
    params = list(module.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


def full_parameters(module: torch.nn.Module) -> torch.Tensor:
    """All parameters, whole (a copy)."""
    with gathered(module):
        return flat_params(module).clone()


if __name__ == "__main__":
    out_dir, name, epochs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    resume_from = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    stop_at_step = int(sys.argv[5]) if len(sys.argv) > 5 else -1
    seed_everything(0)
    strategy = "ddp" if name == "ddp" else CPUDeepSpeedStrategy(stage=int(name.removeprefix("zero")))
    reweighting, pruning, ids, report = LossReweighting("linupper"), DataPruning(), SampleIds(), SampleReport(k=3)
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
    sampler = InfoBatchSampler(N_SAMPLES, prune_ratio=0.5)
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
