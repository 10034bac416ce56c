"""2-process jobs of upcycling between two fits (CPU, gloo), run by ``tests.scripts.suite``: the way
out that ExpertUpcycling's and DenseUpcycling's refusal names under a sharding strategy. A saved
model trains under FSDP2 (Lightning's ``ModelParallelStrategy``) or ZeRO-3, each rank on its own rows;
``weightwise upcycle --checkpoint`` grows it (or makes the dense model a MoE) from the checkpoint the
fit wrote; the written model trains in a second fit of the same strategy.

Each :func:`phase` writes ``OUT_DIR/last.ckpt`` (the strategy's own format: a DCP directory, a
DeepSpeed directory) and ``OUT_DIR/rank{r}.pt``: the rank's training losses, its global step and the
model's loss on one fixed probe batch (the same on both ranks) at the start and the end of the fit.
"""

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from tests.support.strategies import CPUDeepSpeedStrategy
from tests.support.training import gathered, trainer

STEPS = 2
PROBE = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
"""The batch on which the trained and the upcycled model are compared (tests/support/models.py: vocabulary 97)."""


def strategy_for(name: str):
    """``"fsdp2"``: ModelParallelStrategy over 2 data-parallel ranks (its ``"auto"`` sizes would make the
    2 devices one tensor-parallel group: no sharding, the same data on both); ``"zero3"``: ZeRO-3."""
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return CPUDeepSpeedStrategy(stage=int(name.removeprefix("zero")))


class PretrainedLM(pl.LightningModule):
    """A saved transformers causal LM trained with AdamW on token rows; keeps each step's loss."""

    def __init__(self, path: str) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class ShardedLM(PretrainedLM):
    """A saved transformers model; under ``ModelParallelStrategy`` each decoder layer, then the root,
    is sharded with FSDP2's ``fully_shard`` (the recipe of Lightning's ModelParallelStrategy docs)."""

    def configure_model(self):
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)


class Probe(pl.Callback):
    """The model's loss on :data:`PROBE` (eval mode, whole parameters) when training starts and ends."""

    def __init__(self) -> None:
        self.losses: dict[str, float] = {}

    def _measure(self, pl_module, when: str) -> None:
        pl_module.eval()
        with torch.no_grad(), gathered(pl_module):
            self.losses[when] = float(pl_module.model(input_ids=PROBE, labels=PROBE).loss)
        pl_module.train()

    def on_train_start(self, trainer, pl_module):
        self._measure(pl_module, "start")

    def on_train_end(self, trainer, pl_module):
        self._measure(pl_module, "end")


def phase(out_dir: str, strategy: str, model_dir: str) -> None:
    """:data:`STEPS` steps of the saved model under ``strategy``; 8 rows a step, 4 on each rank."""
    out_dir = Path(out_dir)
    pl.seed_everything(0)
    module, probe = ShardedLM(model_dir), Probe()
    tokens = torch.randint(0, module.model.config.vocab_size, (8 * STEPS, 12), generator=torch.Generator().manual_seed(0))
    run = trainer(devices=2, strategy=strategy_for(strategy), max_steps=STEPS, callbacks=[probe])
    run.fit(module, DataLoader(tokens, batch_size=4))  # Lightning's DistributedSampler: each rank its own rows
    run.save_checkpoint(out_dir / "last.ckpt")
    torch.save({"losses": module.losses, "steps": run.global_step, "probe": probe.losses}, out_dir / f"rank{run.global_rank}.pt")


def upcycle(checkpoint: str, model_dir: str, grown_dir: str, options: list[str]) -> None:
    """Between the fits, on rank 0 (the other rank waits): ``weightwise upcycle MODEL_DIR GROWN_DIR
    --checkpoint CHECKPOINT *options`` - the one command the callbacks' refusal names."""
    if dist.get_rank() == 0:
        from weightwise.cli import main

        main(["upcycle", model_dir, grown_dir, "--checkpoint", checkpoint, *options])
    dist.barrier()
