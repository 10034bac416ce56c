"""2-process jobs under DDP and Lightning's DeepSpeedStrategy ZeRO-1/2/3 (CPU, gloo), run by
``tests.scripts.suite``. The strategy is Lightning's own with its CUDA-only device plumbing bridged
(``tests.support.strategies.CPUDeepSpeedStrategy``): DeepSpeed's engine, ZeRO partitioning and
sharded checkpoints are the real ones.

* :func:`fit` - LossReweighting + DataPruning (InfoBatch) + SampleReport + checkpointing; each rank
  saves the full parameters, its score store, the sample ids it trained on, the ledger and the
  report rows. With ``stop_at_step`` the run checkpoints after every step and stops there.
* :func:`layerwise` - LayerwiseSampling on a tiny Llama with two AdamW param groups and a per-step
  LR schedule; per step the layers, learning rates and optimizer memory; run names ``ddp``,
  ``zero1|2|3``, optionally followed by ``bf16`` (bf16-mixed) and/or ``lora`` (peft LoRA adapters).
"""

import gc
import weakref
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy

from tests.support.models import Classifier, TinyLlama, indexed_loader, token_batches
from tests.support.strategies import CPUDeepSpeedStrategy, CPUFSDPStrategy
from tests.support.training import full_parameters, gathered, trainer
from weightwise.callbacks import DataPruning, LayerwiseSampling, LossReweighting, SampleReport
from weightwise.integrations.deepspeed import GROUP_KEY, flat_buffers, master_partition_bytes, master_partitions
from weightwise.layers import find_layer_stack
from weightwise.layers.freezing import optimizer_state_bytes
from weightwise.samplers import InfoBatchSampler

N_SAMPLES, LOCAL_BATCH = 40, 5


def strategy_for(name: str, **options):
    """``"ddp"``, ``CPUFSDPStrategy`` for ``"fsdp"``, or ``CPUDeepSpeedStrategy`` for ``"zero1"``, ``"zero2"``, ``"zero3"``."""
    if name == "ddp":
        return "ddp"
    if name == "fsdp":
        return CPUFSDPStrategy(**options)
    return CPUDeepSpeedStrategy(stage=int(name.removeprefix("zero")), **options)


class SampleIds(Callback):
    def __init__(self) -> None:
        self.ids: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.setdefault(trainer.current_epoch, []).extend(batch.sample_id.tolist())


def fit(out_dir: str, name: str, epochs: int, resume_from: str | None = None, stop_at_step: int = -1) -> None:
    out_dir = Path(out_dir)
    seed_everything(0)
    reweighting, pruning, ids, report = LossReweighting("linupper", warmup_steps=0), DataPruning(), SampleIds(), SampleReport(k=3)
    run = trainer(
        devices=2,
        strategy=strategy_for(name),
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
    run.fit(model, indexed_loader(N_SAMPLES, LOCAL_BATCH, sampler=sampler), ckpt_path=resume_from)
    torch.save(
        {
            "params": full_parameters(model),
            "scores": pruning.reducer.scores.state_dict(),
            "ids": ids.ids,
            "ledger": pruning.ledger,
            "report": report.rows,
        },
        out_dir / f"rank{run.global_rank}.pt",
    )


class GatheredSnapshot(pl.Callback):
    """Every layer's parameters before each step; under ZeRO-3 each rank holds shards, so gather first."""

    def __init__(self) -> None:
        self.params = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _, stack = find_layer_stack(pl_module)
        with gathered(pl_module):
            self.params.append([torch.cat([p.detach().flatten() for p in layer.parameters()]).clone() for layer in stack])


class ScheduledTinyLlama(TinyLlama):
    def configure_optimizers(self):
        matrices = [p for p in self.parameters() if p.dim() >= 2]
        vectors = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}], lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Recorder(pl.Callback):
    """The learning rates each step used, the optimizer's memory after it, and (ZeRO) whether the
    flat parameter buffers of earlier periods' optimizers were freed."""

    def __init__(self) -> None:
        self.lrs, self.memory, self.buffers, self.fp32_detail = [], [], [], []
        self.optimizers: list[weakref.ref] = []  # every ZeRO optimizer a step used
        self.alive_at_build: list[int] = []  # of those, how many were still alive as a new one was built

    def on_fit_start(self, trainer, pl_module):
        # After LayerwiseSampling's on_fit_start: observes the rebuilds at the later periods.
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            engine = trainer.strategy.deepspeed_engine
            configure = engine._configure_optimizer

            def observed(*args, **kwargs):
                self.alive_at_build.append(sum(ref() is not None for ref in self.optimizers))
                return configure(*args, **kwargs)

            engine._configure_optimizer = observed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Runs after LayerwiseSampling's hook (which rebuilds ZeRO at a new period): per split group,
        # does its fp32 master hold more than the bf16 parameters do (carried) or not (built anew)?
        optimizer = trainer.optimizers[0]
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            self.fp32_detail.append({
                group.get(GROUP_KEY): bool((master != master.bfloat16().float()).any())
                for group, master in zip(optimizer.param_groups, master_partitions(optimizer))
            })

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(sorted({(group["weight_decay"], group["lr"]) for group in optimizer.param_groups}))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        deepspeed = isinstance(trainer.strategy, DeepSpeedStrategy)
        self.memory.append({"state": optimizer_state_bytes(optimizer), "master": master_partition_bytes(optimizer) if deepspeed else 0})
        if deepspeed:
            self.buffers.append(weakref.ref(flat_buffers(optimizer)[0]))
            if not any(ref() is optimizer for ref in self.optimizers):
                self.optimizers.append(weakref.ref(optimizer))

    def buffer_counts(self) -> tuple[int, int]:
        """(flat buffers seen, flat buffers still alive); weakref.ref returns one object per referent."""
        gc.collect()
        distinct = {id(ref): ref for ref in self.buffers}.values()
        return len(distinct), sum(ref() is not None for ref in distinct)


def layerwise(out_dir: str, name: str, epochs: int, resume_from: str | None = None) -> None:
    out_dir = Path(out_dir)
    seed_everything(0)
    lora, bf16 = name.endswith("lora"), name.removesuffix("lora").endswith("bf16")
    base = name.removesuffix("lora").removesuffix("bf16")
    # ZeRO-3: partition every parameter (none kept whole), so layers are gathered by module hooks.
    strategy = strategy_for(base, **({"param_persistence_threshold": 0} if base == "zero3" else {}))
    # With LoRA adapters (peft) the loss-credit policy chooses which layers' adapters train; the base weights never do.
    sampling = LayerwiseSampling("loss_credit" if lora else "lisa", n_layers=2, interval=3)
    snapshot, recorder = GatheredSnapshot(), Recorder()
    run = trainer(
        devices=2,
        strategy=strategy,
        max_epochs=epochs,
        callbacks=[sampling, snapshot, recorder, ModelCheckpoint(dirpath=out_dir, save_last=True)],
        default_root_dir=out_dir,
        enable_checkpointing=True,
        precision="bf16-mixed" if bf16 else "32-true",
    )
    module = ScheduledTinyLlama()
    if lora:
        from peft import LoraConfig, get_peft_model

        module.model = get_peft_model(module.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    run.fit(module, token_batches(), ckpt_path=resume_from)
    torch.save(
        {
            "params": full_parameters(module),
            "snapshots": snapshot.params,
            "history": sampling.history,
            "lrs": recorder.lrs,
            "memory": recorder.memory,
            "n_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters()),
            "layer_params": [sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in layer.parameters()) for layer in sampling.stack],
            "importance": sampling.importance,
            "flat_buffers": recorder.buffer_counts(),
            "alive_at_build": recorder.alive_at_build,
            "fp32_detail": recorder.fp32_detail,
            "partitioned": sum(p.ds_tensor.numel() < p.ds_numel for p in module.parameters() if hasattr(p, "ds_tensor")),
        },
        out_dir / f"rank{run.global_rank}.pt",
    )
