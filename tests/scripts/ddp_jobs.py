"""2-process DDP jobs (CPU, gloo), run by ``tests.scripts.suite``; each rank saves what it ended with.

Every job builds its own ``Trainer(devices=2, strategy="ddp")``; the first one launches rank 1.
"""

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from tests.support.models import (
    Classifier,
    TinyLlama,
    TinyMoELM,
    TokenLossLM,
    blobs,
    indexed_loader,
    moe_loader,
    padded_token_batches,
    token_batches,
)
from tests.support.training import Snapshot, flat_params, trainer
from weightwise import IndexedDataset
from weightwise.callbacks import DataPruning, ExpertUpcycling, LayerwiseSampling, LossReweighting
from weightwise.core import collectives
from weightwise.core.store import FIELDS
from weightwise.samplers import InfoBatchSampler

REWEIGHTING_SAMPLES, REWEIGHTING_BATCH, REWEIGHTING_EPOCHS = 48, 6, 2
PRUNING_SAMPLES, PRUNING_EPOCHS = 50, 4


def save(out_dir: str, rank: int, result: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def reweighting(out_dir: str, strategy: str, epochs: int = REWEIGHTING_EPOCHS, resume_from: str | None = None) -> None:
    """LossReweighting on Lightning's DistributedSampler(shuffle=True, seed=0); the test replays its order."""
    seed_everything(0)
    model, callback = Classifier(lr=0.5), LossReweighting(strategy, warmup_steps=0, store_fields=FIELDS)
    fit = trainer(
        devices=2, strategy="ddp", max_epochs=epochs, enable_checkpointing=True,
        callbacks=[callback, ModelCheckpoint(dirpath=out_dir, save_last=True)],
    )
    fit.fit(model, indexed_loader(REWEIGHTING_SAMPLES, REWEIGHTING_BATCH), ckpt_path=resume_from)
    save(out_dir, fit.global_rank, {"params": flat_params(model), "scores": callback.reducer.scores.state_dict()})


class SampleIds(Callback):
    def __init__(self):
        self.ids, self.plans = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.setdefault(trainer.current_epoch, []).extend(batch.sample_id.tolist())

    def on_train_epoch_end(self, trainer, pl_module):
        self.plans[trainer.current_epoch] = trainer.train_dataloader.sampler.plan.indices.tolist()


def pruning(out_dir: str, memory_mapped: bool = False) -> None:
    """InfoBatchSampler + DataPruning: the sampler shards itself (``memory_mapped``: the score store
    lives in files under ``out_dir/store``, one directory per rank)."""
    seed_everything(0)
    recorder, callback = SampleIds(), DataPruning(score_store_path=Path(out_dir) / "store" if memory_mapped else None)
    fit = trainer(devices=2, strategy="ddp", max_epochs=PRUNING_EPOCHS, callbacks=[callback, recorder], use_distributed_sampler=False)
    fit.fit(Classifier(lr=0.5), indexed_loader(PRUNING_SAMPLES, 5, sampler=InfoBatchSampler(PRUNING_SAMPLES, prune_ratio=0.5)))
    scores = callback.reducer.scores
    result = {"ids": recorder.ids, "plans": recorder.plans, "ledger": callback.ledger, "scores": scores.state_dict(), "path": scores.path}
    save(out_dir, fit.global_rank, result)


def upcycling(out_dir: str) -> None:
    """ExpertUpcycling mid-fit: DDP re-wrapped for the new shapes."""
    seed_everything(0)
    module = TinyMoELM(top_k=2)
    fit = trainer(devices=2, strategy="ddp", max_epochs=3, callbacks=[ExpertUpcycling(at_step=2, factor=2, router_noise=1e-2)])
    fit.fit(module, moe_loader())
    result = {"params": flat_params(module), "num_experts": module.model.config.num_experts, "steps": fit.global_step}
    save(out_dir, fit.global_rank, result)


def layerwise(out_dir: str) -> None:
    """LISA with a snapshot of every layer before every step."""
    seed_everything(0)
    sampling, snapshot = LayerwiseSampling("lisa", n_layers=2, interval=2), Snapshot()
    fit = trainer(devices=2, strategy="ddp", max_epochs=4, callbacks=[sampling, snapshot])
    fit.fit(TinyLlama(), token_batches())
    save(out_dir, fit.global_rank, {"snapshots": snapshot.params, "history": sampling.history})


def gather(out_dir: str) -> None:
    """all_gather_variable with *different* lengths per rank (the process group of the earlier fits)."""
    rank = collectives.rank()
    n = 3 if rank == 0 else 5  # unequal on purpose
    losses = torch.arange(n, dtype=torch.float32) + 10 * rank
    (g_losses, g_ids), local = collectives.all_gather_variable(losses, torch.arange(n) + 100 * rank)
    save(out_dir, rank, {"losses": g_losses, "ids": g_ids, "local": (local.start, local.stop)})


class RankBatches(pl.LightningDataModule):
    """Per-rank loaders of different batch sizes: rank 0 trains batches of 3, rank 1 of 5 (``n_steps`` batches)."""

    def __init__(self, n_steps: int = 4):
        super().__init__()
        self.n_steps = n_steps

    def train_dataloader(self):
        part = slice(0, 3) if self.trainer.global_rank == 0 else slice(3, 8)
        batches = [global_batch(step)[part] for step in range(self.n_steps)]
        return DataLoader(IndexedDataset(blobs(8 * self.n_steps)), batch_sampler=batches)


def global_batch(step: int) -> list[int]:
    """The 8 samples of step ``step``: rank 0 holds the first 3, rank 1 the other 5."""
    return list(range(8 * step, 8 * step + 8))


def unequal_batches(out_dir: str) -> None:
    """Ranks with 3 and 5 samples per step: the reducer divides by the global batch (8), not the local."""
    seed_everything(0)
    model, callback = Classifier(lr=0.5), LossReweighting("linupper", warmup_steps=0, store_fields=("weight",))
    fit = trainer(devices=2, strategy="ddp", max_epochs=1, callbacks=[callback], use_distributed_sampler=False)
    fit.fit(model, datamodule=RankBatches())
    save(out_dir, fit.global_rank, {"params": flat_params(model), "weights": callback.reducer.scores.weight})


def accumulation(out_dir: str) -> None:
    """accumulate_grad_batches=2: plain DDP training and LossReweighting("uniform") take the same steps."""
    results = {}
    for name in ("plain", "uniform"):
        seed_everything(3)
        model = Classifier(per_sample=name == "uniform", optimizer="adamw", lr=0.01)
        callbacks = [LossReweighting("uniform")] if name == "uniform" else []
        fit = trainer(devices=2, strategy="ddp", max_epochs=2, accumulate_grad_batches=2, callbacks=callbacks)
        fit.fit(model, indexed_loader(64, 4, shuffle=True) if name == "uniform" else DataLoader(blobs(64), batch_size=4, shuffle=True))
        results[name] = flat_params(model)
    save(out_dir, fit.global_rank, results)


def accumulation_reweighting(out_dir: str, micro_batches: int) -> None:
    """LossReweighting("linupper") at accumulate_grad_batches=2, ranks with 3 and 5 samples a micro-batch:
    each micro-batch's global batch (``global_batch(m)``, 8 samples) is normalised on its own."""
    seed_everything(0)
    model, callback = Classifier(lr=0.5), LossReweighting("linupper", warmup_steps=0, store_fields=("weight",))
    fit = trainer(
        devices=2, strategy="ddp", max_epochs=1, accumulate_grad_batches=2, callbacks=[callback], use_distributed_sampler=False
    )
    fit.fit(model, datamodule=RankBatches(n_steps=micro_batches))
    save(out_dir, fit.global_rank, {"params": flat_params(model), "weights": callback.reducer.scores.weight, "steps": fit.global_step})


def tokens(out_dir: str) -> None:
    """Token losses of padded sequences under DDP: uniform weights with the rank's token share train
    exactly like HF's own loss (each rank's token mean, averaged by DDP)."""
    results = {}
    for mode in ("plain", "tokens"):
        seed_everything(0)
        module = TokenLossLM(mode)
        fit = trainer(devices=2, strategy="ddp", max_steps=3, callbacks=[LossReweighting("uniform")] if mode == "tokens" else [])
        fit.fit(module, padded_token_batches(n=12))
        results[mode] = flat_params(module)
    save(out_dir, fit.global_rank, results)
