"""A 2-process fit (CPU, gloo) of LayerwiseSampling under DDP or Lightning's DeepSpeedStrategy ZeRO-1/2/3.

A tiny Llama with two AdamW param groups (decay / no decay) and a per-step LR schedule. Each rank
saves its layers before every step, the final parameters, the layer history, the learning rates
it stepped with, and (under ZeRO) its master-weight and optimizer-state bytes after each step.

Usage: python -m tests.scripts.deepspeed_layerwise OUT_DIR RUN EPOCHS [RESUME_FROM]   (writes rank0.pt, rank1.pt and
the checkpoint OUT_DIR/last.ckpt). RUN: ddp, zero1, zero2 or zero3, then optionally bf16 (bf16-mixed)
and/or lora (peft LoRA adapters, sampled by IST): e.g. zero2bf16, ddplora, zero2lora.
"""

import gc
import os
import sys
import weakref
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick CUDA on a GPU machine


import lightning.pytorch as pl
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy

from tests.support.models import TinyLlama, token_batches
from tests.support.strategies import CPUDeepSpeedStrategy
from tests.support.training import full_parameters, gathered, trainer
from weightwise.callbacks import LayerwiseSampling
from weightwise.integrations.deepspeed import (
    GROUP_KEY,
    flat_buffers,
    master_partition_bytes,
    master_partitions,
)
from weightwise.layers import find_layer_stack
from weightwise.layers.freezing import optimizer_state_bytes


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

    def buffer_counts(self) -> tuple[int, int]:
        """(flat buffers seen, flat buffers still alive); weakref.ref returns one object per referent."""
        gc.collect()
        distinct = {id(ref): ref for ref in self.buffers}.values()
        return len(distinct), sum(ref() is not None for ref in distinct)


if __name__ == "__main__":
    out_dir, name, epochs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    resume_from = sys.argv[4] if len(sys.argv) > 4 else None
    seed_everything(0)
    lora, bf16 = name.endswith("lora"), name.removesuffix("lora").endswith("bf16")
    stage = 0 if name.startswith("ddp") else int(name.removeprefix("zero").removesuffix("lora").removesuffix("bf16"))
    # ZeRO-3: partition every parameter (none kept whole), so layers are gathered by module hooks.
    strategy = "ddp" if stage == 0 else CPUDeepSpeedStrategy(stage=stage, param_persistence_threshold=0 if stage == 3 else None)
    # With LoRA adapters (peft) IST chooses which layers' adapters train; the base weights never do.
    sampling = LayerwiseSampling("loss_credit" if lora else "lisa", n_layers=2, interval=3)
    snapshot, recorder = GatheredSnapshot(), Recorder()
    fit = trainer(
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
    fit.fit(module, token_batches(), ckpt_path=resume_from)
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
            "fp32_detail": recorder.fp32_detail,
            "partitioned": sum(p.ds_tensor.numel() < p.ds_numel for p in module.parameters() if hasattr(p, "ds_tensor")),
        },
        out_dir / f"rank{fit.global_rank}.pt",
    )
