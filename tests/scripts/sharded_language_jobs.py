"""The language-modelling callbacks' 2-process jobs under DeepSpeed ZeRO-2/3 and FSDP2, run in the sharded
group's launch (``tests/support/distributed.py``); the tests are ``tests/distributed/test_sharded_language_callbacks.py``.

The jobs are the DDP ones (``token_jobs``, ``compute_jobs``, ``mixing_jobs``, ``stream_jobs``) with a
``strategy`` argument; this module gives them the strategy (:func:`strategy_for`), the module class
(:func:`for_strategy`: FSDP2 needs ``fully_shard`` in ``configure_model``) and the whole parameters
(:func:`whole_parameters`), and lists the runs (:data:`SHARDED_LANGUAGE_JOBS`). Each sharded run is
compared with the DDP group's run of the same job (``DDP_JOBS``), so the sharded group runs only the
sharded side: mixing and streams as a first fit and its resumption (the DDP test's straight run is the
reference for both).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from weightwise.integrations.lightning import DeepSpeedLossDividedOnce

STRATEGIES = ("zero2", "zero3", "fsdp2")
TOKEN_RUNS = (("rho1", "zero2"), ("rho1", "zero3"), ("rho1", "fsdp2"), ("dft", "zero3"), ("dft", "fsdp2"), ("dft", "zero2-lightning"))
MIXING_RUNS = (("mapped", "zero2"), ("stream", "zero3"), ("mapped", "fsdp2"), ("stream", "fsdp2"))
MIXING_SAVE_AT = 3
STREAM_SAVE_AT, STREAM_STEPS = 3, 7
BUDGET_TOKENS = int(3.5 * 2 * (16 + 8))
"""``distributed.COMPUTE_BUDGET_TOKENS``, the DDP run's budget (the test checks they are equal)."""


def strategy_for(name: str):
    """``"ddp"``; ``"zero2"``/``"zero3"``: ``CPUDeepSpeedStrategy`` with weightwise's ``DeepSpeedLossDividedOnce``, and with
    ``"-lightning"`` appended Lightning's DeepSpeed precision as it is; ``"fsdp2"``: ``ModelParallelStrategy`` over a
    2-rank data-parallel mesh (``fsdp2_jobs.strategy_for``)."""
    from tests.scripts import fsdp2_jobs
    from tests.support.strategies import CPUDeepSpeedStrategy

    if name == "ddp" or name == "fsdp2":
        return fsdp2_jobs.strategy_for(name)
    stage, as_is = int(name[len("zero")]), name.endswith("-lightning")
    persistence = {"param_persistence_threshold": 0} if stage == 3 else {}  # partition the tiny models' parameters too
    return CPUDeepSpeedStrategy(stage=stage, precision_plugin=None if as_is else DeepSpeedLossDividedOnce("32-true"), **persistence)


def _fully_shard(self: pl.LightningModule) -> None:
    """Under ModelParallelStrategy: each decoder layer (a tiny Llama's), then the trained network (``self.model``
    or ``self.net``), sharded over the data-parallel mesh, as torchtitan and Lightning's FSDP2 guide do."""
    if self.device_mesh is None:
        return
    from torch.distributed.fsdp import fully_shard

    mesh = self.device_mesh["data_parallel"]
    network = self.model if hasattr(self, "model") else self.net
    for layer in getattr(getattr(network, "model", None), "layers", []):
        fully_shard(layer, mesh=mesh)
    fully_shard(network, mesh=mesh)


def for_strategy(cls: type[pl.LightningModule]) -> type[pl.LightningModule]:
    """``cls`` with a ``configure_model`` that applies FSDP2 under ``ModelParallelStrategy`` (and does nothing else)."""
    return type(cls.__name__, (cls,), {"configure_model": _fully_shard})


def layout(module: torch.nn.Module) -> str:
    """How this rank holds the parameters: ``"partitioned"`` (ZeRO-3 holds a partition of each), ``"dtensor"``
    (FSDP2's shards) or ``"whole"`` - so that a test sees the sharded runs sharded."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    if all(hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel for p in params):
        return "partitioned"
    return "dtensor" if all(isinstance(p, DTensor) for p in params) else "whole"


def whole_parameters(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter, whole, in order (ZeRO-3 gathered, FSDP2's DTensors gathered; collective: both ranks call it)."""
    from tests.scripts.fsdp2_jobs import full_parameters

    return full_parameters(module)


SHARDED_LANGUAGE_JOBS = [
    *[("token_jobs:token_weighting", {"out_dir": f"language/tokens/{m}/{s}", "method": m, "strategy": s}) for m, s in TOKEN_RUNS],
    *[("compute_jobs:budget", {"out_dir": f"language/compute/{s}", "tokens": BUDGET_TOKENS, "strategy": s})
      for s in STRATEGIES],
    *[
        job
        for kind, s in MIXING_RUNS
        for job in (
            ("mixing_jobs:fit", {"out_dir": f"language/mixing/{kind}/{s}/first", "kind": kind, "save_at": MIXING_SAVE_AT, "strategy": s}),
            ("mixing_jobs:fit", {"out_dir": f"language/mixing/{kind}/{s}/resumed", "kind": kind, "strategy": s,
                                 "resume_from": f"language/mixing/{kind}/{s}/first/last.ckpt"}),
        )
    ],
    *[
        job
        for s in STRATEGIES
        for job in (
            ("stream_jobs:stream", {"out_dir": f"language/stream/{s}/first", "max_steps": STREAM_SAVE_AT,
                                    "save_every": STREAM_SAVE_AT, "strategy": s}),
            ("stream_jobs:stream", {"out_dir": f"language/stream/{s}/resumed", "max_steps": STREAM_STEPS, "strategy": s,
                                    "resume_from": f"language/stream/{s}/first/step={STREAM_SAVE_AT}.ckpt"}),
        )
    ],
]
"""The sharded runs; ``tests/support/distributed.py`` adds them to ``SHARDED_JOBS``."""
