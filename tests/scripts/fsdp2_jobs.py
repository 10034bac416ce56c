"""2-process jobs under Lightning's ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` per decoder layer,
then the root; per-parameter DTensors) on CPU with gloo, run by ``tests.scripts.suite`` in the sharded
group's launch (``tests/support/distributed.py``). The strategy runs on CPU as it is: nothing is bridged.

* :func:`layerwise` - ``LayerwiseSampling`` (any policy) on a tiny Llama, under ``"fsdp2"`` or ``"ddp"``
  (the same module, not sharded), per step: the active layers, which layers' parameters hold a
  gradient before the optimizer step and optimizer state after it (this rank's), and at the end the
  whole parameters and each parameter's ``requires_grad``. ``stop_at`` ends the fit at that step with a
  checkpoint (``last.ckpt``, a ``torch.distributed.checkpoint`` directory under FSDP2); ``resume_from``
  continues one.
"""

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from tests.support.models import TinyLlama, token_batches
from tests.support.training import trainer
from weightwise.callbacks import LayerwiseSampling

LAYERS = 6
POLICIES = {
    # short periods, so that a few steps see several (IST: probes every 2 steps on each rank's own micro-batch,
    # so the ranks' probe losses differ and only their average makes the layer scores agree)
    "lisa": dict(n_layers=2, interval=2),
    "ist": dict(probe_every=2, probe_batch_size=None),
    "badam": dict(interval=2, order="random"),
    "block_influence": dict(interval=2, refresh_every=1),
}


class ShardedLlama(TinyLlama):
    """TinyLlama, each decoder layer and then the root wrapped by ``fully_shard`` under
    ``ModelParallelStrategy`` (as torchtitan and Lightning's FSDP2 guide do); unsharded under DDP."""

    def configure_model(self):
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def whole(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def full_parameters(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter, whole (FSDP2: each DTensor gathered; a collective, both ranks call it)."""
    return torch.cat([whole(p.detach()).flatten() for p in module.parameters()]).clone()


class StateRecorder(pl.Callback):
    """Per step and layer of the stack: did any parameter hold a gradient at the optimizer step, and
    optimizer state after it; the parameters outside the stack, the same."""

    def __init__(self, sampling: LayerwiseSampling) -> None:
        self.sampling = sampling
        self.active, self.grads, self.states, self.outside = [], [], [], []

    def _per_layer(self, held) -> list[bool]:
        return [any(held(p) for p in layer.parameters()) for layer in self.sampling.stack]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.active.append(list(self.sampling.active))
        self.grads.append(self._per_layer(lambda p: p.grad is not None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = trainer.optimizers[0].state
        self.states.append(self._per_layer(lambda p: p in state))
        in_stack = {p for layer in self.sampling.stack for p in layer.parameters()}
        outside = [p for p in pl_module.parameters() if p not in in_stack]
        self.outside.append((all(p.grad is not None for p in outside), all(p in state for p in outside)))


def layerwise(out_dir: str, name: str, policy: str, max_steps: int, stop_at: int = -1, resume_from: str | None = None) -> None:
    out_dir = Path(out_dir)
    seed_everything(0)
    sampling = LayerwiseSampling(policy, **POLICIES[policy])
    recorder = StateRecorder(sampling)
    run = trainer(
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if name == "fsdp2" else "ddp",
        max_epochs=-1,
        max_steps=stop_at if stop_at > 0 else max_steps,
        callbacks=[sampling, recorder, ModelCheckpoint(dirpath=out_dir, save_last=True)],
        default_root_dir=out_dir,
        enable_checkpointing=True,
    )
    module = ShardedLlama(LAYERS)
    run.fit(module, token_batches(), ckpt_path=resume_from)
    torch.save(
        {
            "params": full_parameters(module),
            "requires_grad": [p.requires_grad for p in module.parameters()],
            # FSDP2: the elements of the parameters this rank holds (its shards); DDP: every element
            "local_numel": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters()),
            "numel": sum(p.numel() for p in module.parameters()),
            "history": sampling.history,
            "active": recorder.active,
            "grads": recorder.grads,
            "states": recorder.states,
            "outside": recorder.outside,
        },
        out_dir / f"rank{run.global_rank}.pt",
    )
