"""Lightning's real distributed strategies, with their CUDA-only device plumbing bridged to CPU."""

from __future__ import annotations

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's real ``DeepSpeedStrategy`` (ZeRO-``stage``), made to run on CPU with gloo.

    Lightning refuses DeepSpeed without CUDA only in its device plumbing; DeepSpeed's ZeRO engines
    themselves run on CPU. Three overrides bridge that for the tests: no CUDA check, CPU devices
    carry the local rank as their index (DeepSpeed reads it), and the distributed setup skips the
    CUDA device-index validation. Everything else - engine, ZeRO optimizer, partitioning, sharded
    checkpoints - is DeepSpeed's and Lightning's own code. Usable from a LightningCLI config as
    ``trainer.strategy: {class_path: helpers.CPUDeepSpeedStrategy, init_args: {stage: 2}}``.
    """

    def __init__(self, stage: int = 2, param_persistence_threshold: int | None = None, **kwargs) -> None:
        super().__init__(stage=stage, process_group_backend="gloo", **kwargs)
        if param_persistence_threshold is not None:  # ZeRO-3 keeps parameters below it whole on every rank
            self.config["zero_optimization"]["stage3_param_persistence_threshold"] = param_persistence_threshold

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's real ``FSDPStrategy`` (PyTorch FSDP), run on CPU with gloo.

    Lightning refuses FSDP without a CUDA accelerator in its accelerator connector, which checks
    for the ``FSDPStrategy`` type exactly, and passes FSDP the CUDA index of the root device, which
    CPU devices lack (FSDP then looks for an accelerator and finds none). This subclass passes the
    type check, picks gloo and wraps the model with ``device_id=cpu``; FSDP's flattening, sharding,
    gradient reduction and state-dict gathering are PyTorch's own. Checkpoints are sharded
    (``state_dict_type="sharded"``) by default: gathering a full state dict on CPU crashes torch 2.13
    (FSDP's ``offload_to_cpu``, which Lightning sets for several ranks, leaves the tensors it clones
    without storage when they already are on the CPU).
    """

    def __init__(self, state_dict_type: str = "sharded", **kwargs) -> None:
        super().__init__(process_group_backend="gloo", state_dict_type=state_dict_type, **kwargs)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
