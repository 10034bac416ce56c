"""2-process jobs under Lightning's ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` per decoder layer,
then the root; per-parameter DTensors) and ``FSDPStrategy`` (FSDP1) on CPU with gloo, run by
``tests.scripts.suite`` in the sharded group's launch (``tests/support/distributed.py``).
``ModelParallelStrategy`` runs on CPU as it is; FSDP1 through ``tests.support.strategies.CPUFSDPStrategy``.

* :func:`layerwise` - ``LayerwiseSampling`` (any policy) on a tiny Llama, under ``"fsdp2"``, ``"fsdp1"``
  (``FSDPStrategy(use_orig_params=True)``, a unit per decoder layer) or ``"ddp"`` (the same module, not
  sharded), per step: the active layers, which layers' parameters hold a gradient before the optimizer
  step and optimizer state after it (this rank's), and at the end the whole parameters and each
  parameter's ``requires_grad`` (``raise_at``: after a fit that raised there). Every run ends with a checkpoint (``last.ckpt``, a sharded directory
  under FSDP: ``torch.distributed.checkpoint``'s); ``resume_from`` continues one.
* :func:`mesh` - what ``ModelParallelStrategy()``'s defaults shard on one node (nothing).
* :func:`fsdp1_frozen` - FSDP1 (``FSDPStrategy(use_orig_params=True)``): the gradient and optimizer state
  each rank holds for a layer whose original parameters are frozen after wrapping.
"""

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from tests.support.models import TinyLlama, token_batches
from tests.support.strategies import CPUFSDPStrategy
from tests.support.training import gathered, trainer
from weightwise.callbacks import LayerwiseSampling

LAYERS = 6
POLICIES = {
    # short periods, so that a few steps see several (IST: probes every 2 steps on each rank's own micro-batch,
    # so the ranks' probe losses differ and only their average makes the layer scores agree)
    "lisa": dict(n_layers=2, interval=3),
    "ist": dict(probe_every=2, probe_batch_size=None),
    "badam": dict(interval=2, order="random"),
    "block_influence": dict(interval=2, refresh_every=1),
}


def strategy_for(name: str):
    """``"fsdp2"``: ModelParallelStrategy over a 2-rank data-parallel mesh (its default on one node is
    data_parallel_size=1, tensor_parallel_size=devices: fully_shard over that mesh would shard nothing);
    ``"fsdp1"``: FSDPStrategy(use_orig_params=True), each decoder layer its own unit; ``"ddp"``."""
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    if name == "fsdp1":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return CPUFSDPStrategy(use_orig_params=True, auto_wrap_policy={LlamaDecoderLayer})
    return name


class ShardedLlama(TinyLlama):
    """TinyLlama, each decoder layer and then the root wrapped by ``fully_shard`` under
    ``ModelParallelStrategy`` (as torchtitan and Lightning's FSDP2 guide do), with ``bf16`` FSDP2's
    mixed precision (bf16 weights in the forward and backward, gradients reduced and stepped in fp32);
    unsharded under DDP."""

    def __init__(self, layers: int, bf16: bool = False) -> None:
        super().__init__(layers)
        self.bf16 = bf16

    def configure_model(self):
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else MixedPrecisionPolicy()
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mixed)
        fully_shard(self.model, mesh=mesh, mp_policy=mixed)


def whole(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def local(p: torch.Tensor) -> torch.Tensor:
    """The elements of ``p`` this rank holds (a DTensor's shard)."""
    return p.to_local() if hasattr(p, "to_local") else p


def full_parameters(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter, whole (FSDP2: each DTensor gathered; FSDP1: the flat parameters; collectives, both ranks call it)."""
    with gathered(module):
        return torch.cat([whole(p.detach()).flatten() for p in module.parameters()]).clone()


class StateRecorder(pl.Callback):
    """Per step and layer of the stack: did any parameter hold a gradient at the optimizer step, and
    optimizer state after it; the parameters outside the stack, the same."""

    def __init__(self, sampling: LayerwiseSampling) -> None:
        self.sampling = sampling
        self.active, self.grads, self.states, self.outside = [], [], [], []
        self.grad_dtypes: set[str] = set()

    def _per_layer(self, held) -> list[bool]:
        return [any(held(p) for p in layer.parameters()) for layer in self.sampling.stack]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.active.append(list(self.sampling.active))
        self.grads.append(self._per_layer(lambda p: p.grad is not None))
        self.grad_dtypes |= {str(p.grad.dtype) for p in pl_module.parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = trainer.optimizers[0].state
        self.states.append(self._per_layer(lambda p: p in state))
        in_stack = {p for layer in self.sampling.stack for p in layer.parameters()}
        # those of which this rank holds elements (FSDP1 with use_orig_params: a rank's shard of a flat parameter
        # may hold no element of a parameter, which then has no gradient and no state there)
        outside = [p for p in pl_module.parameters() if p not in in_stack and local(p).numel() > 0]
        self.outside.append((all(p.grad is not None for p in outside), all(p in state for p in outside)))


class RaiseAt(pl.Callback):
    """Raise in the middle of the fit, at step ``step`` (contract 6: the module is given back when fit raises)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("raised mid-fit by the test")


def layerwise(
    out_dir: str, name: str, policy: str, epochs: int, resume_from: str | None = None, bf16: bool = False, raise_at: int = -1
) -> None:
    out_dir = Path(out_dir)
    seed_everything(0)
    sampling = LayerwiseSampling(policy, **POLICIES[policy])
    recorder = StateRecorder(sampling)
    run = trainer(
        devices=2,
        strategy=strategy_for(name),
        max_epochs=epochs,  # 2 steps an epoch (4 samples a rank, batches of 2); a first run stops at an epoch's end
        callbacks=[sampling, recorder, ModelCheckpoint(dirpath=out_dir, save_last=True), RaiseAt(raise_at)],
        default_root_dir=out_dir,
        enable_checkpointing=True,
    )
    module = ShardedLlama(LAYERS, bf16=bf16)
    numel = sum(p.numel() for p in module.parameters())  # before FSDP1 makes each parameter a view of this rank's shard
    try:
        run.fit(module, token_batches(), ckpt_path=resume_from)
    except RuntimeError as error:
        if raise_at < 0:
            raise
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"rank {run.global_rank}: {error}")
    torch.save(
        {
            "params": full_parameters(module),
            "requires_grad": [p.requires_grad for p in module.parameters()],
            "patched": "load_checkpoint" in vars(run.strategy),  # LayerwiseSampling's wrapper, removed at teardown
            # FSDP: the elements of the parameters this rank holds (its shards); DDP: every element
            "local_numel": sum(local(p).numel() for p in module.parameters()),
            "numel": numel,
            "history": sampling.history,
            "importance": sampling.importance,  # IST's scores, block influence's measurements; None for LISA, BAdam
            "active": recorder.active,
            "grads": recorder.grads,
            "states": recorder.states,
            "outside": recorder.outside,
            "grad_dtypes": recorder.grad_dtypes,
        },
        out_dir / f"rank{run.global_rank}.pt",
    )


class FrozenFSDP1Layer(pl.Callback):
    """Layer 0 frozen at step ``freeze_at`` as layer sampling freezes (``requires_grad=False``, ``grad=None``,
    Adam state popped) and thawed at ``thaw_at``. Per step, before the optimizer step: the gradient
    elements this rank holds in FSDP's flat parameters (its shards), and whether layer 0's original
    parameters hold a gradient; after it: whether they hold optimizer state."""

    def __init__(self, freeze_at: int, thaw_at: int) -> None:
        self.freeze_at, self.thaw_at = freeze_at, thaw_at
        self.flat_grad_numel, self.orig_grads, self.orig_states = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in (self.freeze_at, self.thaw_at):
            frozen = trainer.global_step == self.freeze_at
            for p in pl_module.model.model.layers[0].parameters():
                p.requires_grad_(not frozen)
                p.grad = None
                if frozen:
                    trainer.optimizers[0].state.pop(p, None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from torch.distributed.fsdp import FullyShardedDataParallel

        units = [m for m in trainer.strategy.model.modules() if isinstance(m, FullyShardedDataParallel)]
        flat = [unit._handle.flat_param for unit in units if unit._handle is not None]  # torch's private FSDP1 handle, read
        self.flat_grad_numel.append(sum(0 if f.grad is None else f.grad.numel() for f in flat))
        self.orig_grads.append(any(p.grad is not None for p in pl_module.model.model.layers[0].parameters()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = trainer.optimizers[0].state
        self.orig_states.append(any(p in state for p in pl_module.model.model.layers[0].parameters()))


def fsdp1_frozen(out_dir: str, wrap: str) -> None:
    """FSDP1 (``FSDPStrategy(use_orig_params=True)``): what each rank holds for a layer whose original
    parameters are frozen after wrapping (:class:`FrozenFSDP1Layer`: frozen for steps 2-3 of 6), with
    each decoder layer its own flat parameter (``wrap="layer"``) or the whole model one (``"model"``)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    seed_everything(0)
    recorder = FrozenFSDP1Layer(freeze_at=2, thaw_at=4)
    policy = {"auto_wrap_policy": {LlamaDecoderLayer}} if wrap == "layer" else {}
    run = trainer(devices=2, strategy=CPUFSDPStrategy(use_orig_params=True, **policy), max_epochs=3, callbacks=[recorder])
    module = TinyLlama(LAYERS)
    numel = sum(p.numel() for p in module.parameters())
    layer_numel = sum(p.numel() for p in module.model.model.layers[0].parameters())
    run.fit(module, token_batches())
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "numel": numel,
            "layer_numel": layer_numel,
            "flat_grad_numel": recorder.flat_grad_numel,
            "orig_grads": recorder.orig_grads,
            "orig_states": recorder.orig_states,
        },
        Path(out_dir) / f"rank{run.global_rank}.pt",
    )


def mesh(out_dir: str, defaults: bool) -> None:
    """One step under ``ModelParallelStrategy()`` with its defaults (``defaults=True``) or over a 2-rank
    data-parallel mesh: each rank's mesh, the distributed sampler's replicas and the parameter elements
    it holds (benchmarks/RESULTS.md: on one node the defaults shard nothing)."""
    strategy = ModelParallelStrategy() if defaults else strategy_for("fsdp2")
    module = ShardedLlama(LAYERS)
    numel = sum(p.numel() for p in module.parameters())
    run = trainer(devices=2, strategy=strategy, max_steps=1)
    run.fit(module, token_batches())
    device_mesh = run.strategy.device_mesh
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "mesh": dict(zip(device_mesh.mesh_dim_names, device_mesh.shape)),
            "replicas": run.strategy.distributed_sampler_kwargs["num_replicas"],
            "local_numel": sum(local(p).numel() for p in module.parameters()),
            "numel": numel,
        },
        Path(out_dir) / f"rank{run.global_rank}.pt",
    )
