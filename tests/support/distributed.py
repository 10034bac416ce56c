"""The 2-process runs of ``tests/distributed``: the jobs of each launch, and the checks they share.

Every job of a group runs in one 2-process launch (``tests.scripts.suite``), once per session: the
session fixtures ``ddp_runs`` and ``sharded_runs`` (``tests/distributed/conftest.py``) launch
:data:`DDP_JOBS` and :data:`SHARDED_JOBS`, and the tests read each job's output directory through
:class:`Runs`. The jobs are listed here, next to each other, so a reader sees what runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.scripts.sharded_language_jobs import SHARDED_LANGUAGE_JOBS
from tests.support.contracts import CASES
from tests.support.processes import ranks, run_suite

FIT_EPOCHS = 2
"""Epochs of the sharded group's ``deepspeed_jobs:fit`` runs (the first-and-resumed pairs stop after one)."""

ACCUMULATION_MICRO_BATCHES = 8
"""Micro-batches of the ``accumulation_reweighting`` job (``accumulate_grad_batches=2``: 4 optimizer steps)."""

COMPUTE_BUDGET_TOKENS = int(3.5 * 2 * (16 + 8))
"""The ``compute_budget`` job's budget: 3.5 steps of both ranks' batches (2 rows each of
``compute_jobs.LENGTHS`` = 16 and 8 tokens)."""

DDP_JOBS = [
    ("ddp_jobs:reweighting", {"out_dir": "reweighting_first", "strategy": "linupper", "epochs": 1}),
    ("ddp_jobs:reweighting", {"out_dir": "reweighting_resumed", "strategy": "linupper", "resume_from": "reweighting_first/last.ckpt"}),
    ("ddp_jobs:reweighting", {"out_dir": "reweighting_linupper", "strategy": "linupper"}),
    ("ddp_jobs:reweighting", {"out_dir": "reweighting_quadratic", "strategy": "quadratic"}),
    ("ddp_jobs:gather", {"out_dir": "gather"}),
    ("ddp_jobs:pruning", {"out_dir": "pruning"}),
    ("ddp_jobs:pruning", {"out_dir": "pruning_mapped", "memory_mapped": True}),
    ("ddp_jobs:upcycling", {"out_dir": "upcycling"}),
    ("ddp_jobs:layerwise", {"out_dir": "layerwise"}),
    ("ddp_jobs:unequal_batches", {"out_dir": "unequal_batches"}),
    ("ddp_jobs:accumulation", {"out_dir": "accumulation"}),
    ("ddp_jobs:accumulation_reweighting", {"out_dir": "accumulation_reweighting", "micro_batches": ACCUMULATION_MICRO_BATCHES}),
    ("ddp_jobs:tokens", {"out_dir": "tokens"}),
    *[("token_jobs:token_weighting", {"out_dir": f"tokens/{method}", "method": method}) for method in ("rho1", "dft")],
    ("compute_jobs:budget", {"out_dir": "compute_budget", "tokens": COMPUTE_BUDGET_TOKENS}),
    *[
        job
        for kind in ("mapped", "stream")
        for job in (
            ("mixing_jobs:fit", {"out_dir": f"mixing/{kind}", "kind": kind}),
            ("mixing_jobs:fit", {"out_dir": f"mixing/{kind}_first", "kind": kind, "save_at": 3}),
            ("mixing_jobs:fit", {"out_dir": f"mixing/{kind}_resumed", "kind": kind, "resume_from": f"mixing/{kind}_first/last.ckpt"}),
        )
    ],
    ("stream_jobs:stream", {"out_dir": "stream_straight", "max_steps": 7}),
    ("stream_jobs:stream", {"out_dir": "stream_first", "max_steps": 3, "save_every": 3}),
    ("stream_jobs:stream", {"out_dir": "stream_resumed", "max_steps": 7, "resume_from": "stream_first/step=3.ckpt"}),
    *[("agreement_jobs:decide", {"out_dir": f"agreement/ddp/{case.name}", "case": case.name}) for case in CASES],
]

ZERO3_AGREEMENT = ("reweighting", "infobatch", "lisa", "ist", "block_influence", "perplexity")
FSDP_AGREEMENT = (
    "reweighting", "reweighting_window", "online", "infobatch", "rs2", "importance", "data_diet", "ccs", "perplexity",
    "dsir_resample", "dsir_weight",
)
BETWEEN_FITS = [  # (name, strategy, saved model - the sharded_runs fixture writes them, `weightwise upcycle` options)
    ("fsdp2/moe", "fsdp2", "moe/E_top1", ["--factor", "2", "--selection", "weight-norm"]),
    ("fsdp2/dense", "fsdp2", "dense/between/dense", ["--from-dense", "--experts", "4", "--top-k", "2"]),
    ("zero3/moe", "zero3", "moe/E", ["--factor", "2", "--method", "granular"]),
    ("zero3/dense", "zero3", "dense/between/dense", ["--from-dense", "--experts", "4", "--top-k", "2"]),
]
SHARDED_JOBS = [
    ("deepspeed_jobs:fit", {"out_dir": "fit/ddp", "name": "ddp", "epochs": FIT_EPOCHS}),
    *[("deepspeed_jobs:fit", {"out_dir": f"fit/zero{s}", "name": f"zero{s}", "epochs": FIT_EPOCHS}) for s in (1, 2, 3)],
    *[("deepspeed_jobs:fit", {"out_dir": f"sharded/zero{s}/first", "name": f"zero{s}", "epochs": 1}) for s in (1, 2, 3)],
    *[
        ("deepspeed_jobs:fit", {"out_dir": f"sharded/zero{s}/resumed", "name": f"zero{s}", "epochs": FIT_EPOCHS,
                                "resume_from": f"sharded/zero{s}/first/last.ckpt"})
        for s in (1, 2, 3)
    ],
    *[
        ("deepspeed_jobs:fit", {"out_dir": f"mid_epoch/{n}/first", "name": n, "epochs": FIT_EPOCHS, "stop_at_step": 5})
        for n in ("ddp", "zero2")
    ],
    *[
        ("deepspeed_jobs:fit", {"out_dir": f"mid_epoch/{n}/resumed", "name": n, "epochs": FIT_EPOCHS,
                                "resume_from": f"mid_epoch/{n}/first/last.ckpt"})
        for n in ("ddp", "zero2")
    ],
    *[("deepspeed_jobs:layerwise", {"out_dir": f"layerwise/{n}", "name": n, "epochs": 3}) for n in ("ddp", "zero1", "zero2", "zero3")],
    *[("deepspeed_jobs:layerwise", {"out_dir": f"layerwise_resume/zero{s}/first", "name": f"zero{s}", "epochs": 1}) for s in (2, 3)],
    *[
        ("deepspeed_jobs:layerwise", {"out_dir": f"layerwise_resume/zero{s}/resumed", "name": f"zero{s}", "epochs": 3,
                                      "resume_from": f"layerwise_resume/zero{s}/first/last.ckpt"})
        for s in (2, 3)
    ],
    *[("deepspeed_jobs:layerwise", {"out_dir": f"layerwise/zero{s}bf16", "name": f"zero{s}bf16", "epochs": 3}) for s in (2, 3)],
    *[("deepspeed_jobs:layerwise", {"out_dir": f"layerwise/{n}", "name": n, "epochs": 5}) for n in ("ddplora", "zero2lora")],
    # Drop-Upcycling under DDP: random routers *and* re-initialised units, which every rank must draw alike
    ("dense_jobs:dense_upcycling", {"out_dir": "dense/drop", "method": "drop"}),
    # upcycling between two fits under FSDP2 and ZeRO-3: fit, `weightwise upcycle --checkpoint`, fit the written model
    *[
        job
        for name, strategy, model, options in BETWEEN_FITS
        for job in (
            ("upcycle_jobs:phase", {"out_dir": f"between/{name}/phase1", "strategy": strategy, "model_dir": model}),
            ("upcycle_jobs:upcycle", {"checkpoint": f"between/{name}/phase1/last.ckpt", "model_dir": model,
                                      "grown_dir": f"between/{name}/grown", "options": options}),
            ("upcycle_jobs:phase", {"out_dir": f"between/{name}/phase2", "strategy": strategy, "model_dir": f"between/{name}/grown"}),
        )
    ],
    *[("agreement_jobs:decide", {"out_dir": f"agreement/zero2/{c.name}", "case": c.name, "strategy": "zero2"}) for c in CASES if c.zero],
    *[("agreement_jobs:decide", {"out_dir": f"agreement/zero3/{n}", "case": n, "strategy": "zero3"}) for n in ZERO3_AGREEMENT],
    ("deepspeed_jobs:fit", {"out_dir": "fit/fsdp", "name": "fsdp", "epochs": FIT_EPOCHS}),
    ("deepspeed_jobs:fit", {"out_dir": "sharded/fsdp/first", "name": "fsdp", "epochs": 1}),
    ("deepspeed_jobs:fit", {"out_dir": "sharded/fsdp/resumed", "name": "fsdp", "epochs": FIT_EPOCHS, "resume_from": "sharded/fsdp/first/last.ckpt"}),
    ("deepspeed_jobs:fit", {"out_dir": "mid_epoch/fsdp/first", "name": "fsdp", "epochs": FIT_EPOCHS, "stop_at_step": 5}),
    ("deepspeed_jobs:fit", {"out_dir": "mid_epoch/fsdp/resumed", "name": "fsdp", "epochs": FIT_EPOCHS,
                            "resume_from": "mid_epoch/fsdp/first/last.ckpt"}),
    *[("agreement_jobs:decide", {"out_dir": f"agreement/fsdp/{n}", "case": n, "strategy": "fsdp"}) for n in FSDP_AGREEMENT],
    # LayerwiseSampling under ModelParallelStrategy (FSDP2): every policy; LISA (state released) and IST (state kept)
    # also under DDP and stopped after 2 of 4 epochs, then resumed from the sharded checkpoint
    *[("fsdp2_jobs:layerwise", {"out_dir": f"layers_fsdp2/{p}/straight", "name": "fsdp2", "policy": p, "epochs": 4})
      for p in ("lisa", "ist", "badam", "block_influence")],
    ("fsdp2_jobs:layerwise", {"out_dir": "layers_fsdp2/lisa/bf16", "name": "fsdp2", "policy": "lisa", "epochs": 4, "bf16": True}),
    ("fsdp2_jobs:layerwise", {"out_dir": "layers_fsdp2/lisa/raised", "name": "fsdp2", "policy": "lisa", "epochs": 4, "raise_at": 4}),
    *[
        job
        for p in ("lisa", "ist")
        for job in (
            ("fsdp2_jobs:layerwise", {"out_dir": f"layers_fsdp2/{p}/ddp", "name": "ddp", "policy": p, "epochs": 4}),
            ("fsdp2_jobs:layerwise", {"out_dir": f"layers_fsdp2/{p}/first", "name": "fsdp2", "policy": p, "epochs": 2}),
            ("fsdp2_jobs:layerwise", {"out_dir": f"layers_fsdp2/{p}/resumed", "name": "fsdp2", "policy": p, "epochs": 4,
                                      "resume_from": f"layers_fsdp2/{p}/first/last.ckpt"}),
        )
    ],
    # FSDPStrategy(use_orig_params=True), each decoder layer a unit: LISA straight, stopped and resumed; IST's probes
    # and block influence's measurements (forwards outside the training step)
    *[("fsdp2_jobs:layerwise", {"out_dir": f"layers_fsdp1/{p}/straight", "name": "fsdp1", "policy": p, "epochs": 4})
      for p in ("lisa", "ist", "block_influence")],
    ("fsdp2_jobs:layerwise", {"out_dir": "layers_fsdp1/lisa/first", "name": "fsdp1", "policy": "lisa", "epochs": 2}),
    ("fsdp2_jobs:layerwise", {"out_dir": "layers_fsdp1/lisa/resumed", "name": "fsdp1", "policy": "lisa", "epochs": 4,
                              "resume_from": "layers_fsdp1/lisa/first/last.ckpt"}),
    # what FSDP1 (use_orig_params=True) holds for a layer frozen after wrapping: each decoder layer a unit, or one unit
    *[("fsdp2_jobs:fsdp1_frozen", {"out_dir": f"layers_fsdp1/frozen/{wrap}", "wrap": wrap}) for wrap in ("layer", "model")],
]
SHARDED_JOBS += SHARDED_LANGUAGE_JOBS  # TokenWeighting, SelectiveTokens, ComputeBudget, DomainMixing, streams under ZeRO-2/3, FSDP2

PATH_ARGUMENTS = ("out_dir", "resume_from", "model_dir", "phase1_dir", "source_dir", "trained_dir", "grown_dir", "checkpoint")
"""Job arguments that name directories: relative to the group's root."""


class Runs:
    """A group's output root; ``runs("job_dir")`` is what each rank of that job saved."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, out_dir: str) -> list[dict]:
        return ranks(self.root / out_dir)


def launch(root: Path, jobs: list) -> Runs:
    """Run ``jobs`` in one 2-process launch, their directories under ``root``."""
    absolute = []
    for job, kwargs in jobs:
        paths = {k: str(root / v) if k in PATH_ARGUMENTS else v for k, v in kwargs.items()}
        absolute.append((job, paths))
    run_suite(absolute, root)
    return Runs(root)


def assert_equal_decisions(first, second, path=""):
    """Two ranks' (or runs') decisions, equal exactly (tensors with NaN read as -1)."""
    if isinstance(first, torch.Tensor):
        assert isinstance(second, torch.Tensor) and torch.equal(first.nan_to_num(-1), second.nan_to_num(-1)), path
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), path
        for key in first:
            assert_equal_decisions(first[key], second[key], f"{path}.{key}")
    else:
        assert first == second, path


def assert_same_training(ranks: list[dict], reference: list[dict], epochs: range) -> None:
    """Each rank of a ``deepspeed_jobs:fit`` run trained like the reference's same rank, in ``epochs``."""
    for rank, expected in zip(ranks, reference):
        assert torch.allclose(rank["params"], expected["params"], atol=1e-6)
        for field, value in expected["scores"].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(rank["scores"][field], value), field
        assert [rank["ids"][e] for e in epochs] == [expected["ids"][e] for e in epochs]
