"""Per-step bookkeeping side by side: official InfoBatch's ``update`` vs weightwise's reducer + store.

Both do the same work per step for a batch of B samples out of N: read each sample's epoch weight,
record its loss in the per-sample table, and return the weighted mean of the losses. The official
code (``NUS-HPC-AI-Lab/InfoBatch``, ``infobatch/infobatch.py``, ``InfoBatch.update``) is taken
from its public repository for the run and never committed: pass ``--official PATH`` to a checkout
(the file is imported from there; note that importing it patches PyTorch's DataLoader iterator, as
it does in its own users' programs - nothing here iterates a DataLoader).

weightwise's side is what runs every step of a fit: the ``training_step`` that
``PerSampleLossReducer.install`` wraps around the module's own (it calls
``PerSampleLossReducer.reduce``, which parses the step's output, finds the sample ids, checks the
loss, multiplies the contributors' weights, records the step in the score store and returns the
weighted mean), with a ``DataPruning`` contributor whose ``InfoBatchSampler`` planned the epoch, on
the score store that InfoBatch needs (the latest loss only). The module's own ``training_step``
returns a prepared output (the cost of a Python call). One process, so the gather is the identity.
Two ways of passing the ids, both timed: in the batch (``IndexedDataset``'s ``"sample_id"``) and
in the output dict (``{"loss": losses, "sample_ids": ids}``).

The official side is ``set_active_indices`` (what its DataLoader hook calls per batch) and
``update`` on a fresh copy of the losses (``update`` scales its input in place; the copy keeps the
graph, as in training); the copy's cost is printed, and the ratio without it.

Run (from the repository root):
    .venv/bin/python -m benchmarks.bookkeeping --official benchmarks/.cache/InfoBatch [--n 1000000] [--repeats 2000]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import torch

from benchmarks.timing import median_seconds
from weightwise import SampleScoreStore
from weightwise.callbacks import DataPruning
from weightwise.samplers import InfoBatchSampler
from weightwise.weighting.reducer import PerSampleLossReducer


def median_us(fn, repeats: int) -> float:
    return 1e6 * median_seconds(fn, repeats, warmup=min(20, repeats))


def official_infobatch(path: Path, n: int):
    spec = importlib.util.spec_from_file_location("official_infobatch", path / "infobatch" / "infobatch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    infobatch = module.InfoBatch(range(n), num_epochs=10, prune_ratio=0.5)
    infobatch.scores = torch.rand(n)  # every sample seen
    infobatch.prune()  # an epoch's weights
    return infobatch


class Prepared(pl.LightningModule):
    """A module whose ``training_step`` returns the output it is given: the reducer's cost alone."""

    def __init__(self) -> None:
        super().__init__()
        self.output = None

    def training_step(self, batch, batch_idx):
        return self.output


def installed_reducer(n: int) -> tuple[Prepared, PerSampleLossReducer]:
    """A module with the reducer installed, as ``DataPruning.setup`` leaves it."""
    pruning = DataPruning()
    trainer = SimpleNamespace(global_step=1, _logger_connector=SimpleNamespace(should_update_logs=False), callbacks=[pruning])
    sampler = InfoBatchSampler(n, prune_ratio=0.5, num_epochs=10, num_replicas=1, rank=0)
    pruning.sampler = sampler
    module = Prepared()
    reducer = PerSampleLossReducer.install(trainer, module, [pruning])
    assert reducer.needs_sample_ids
    reducer.scores = SampleScoreStore(n, fields=sampler.store_fields)
    reducer.scores.update(torch.arange(n), torch.rand(n), step=0)  # every sample seen
    sampler.attach_scores(reducer.scores)
    sampler.set_epoch(1)
    assert sampler.plan.weights is not None  # an epoch's weights, planned
    return module, reducer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of NUS-HPC-AI-Lab/InfoBatch")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--batches", default="256,4096")
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {platform.processor() or platform.machine()}, N = {args.n:,}")
    official, (module, reducer) = official_infobatch(args.official, args.n), installed_reducer(args.n)
    print(f"store bytes per sample: weightwise {reducer.scores.bytes_per_sample}, official 8 (scores + weights, float32)")
    print("| batch | ids | official (us) | weightwise (us) | ratio | official's copy (us) | ratio, copy not counted |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    generator = torch.Generator().manual_seed(0)
    for batch in map(int, args.batches.split(",")):
        ids = torch.randperm(args.n, generator=generator)[:batch]
        losses = torch.rand(batch, generator=generator).requires_grad_()
        features = torch.zeros(batch, 1)

        def official_step():
            official.set_active_indices(ids)
            return official.update(losses.clone())  # update scales its input in place; with its graph, as in training

        for where, output, data in (
            ("in the batch", losses, {"x": features, "sample_id": ids}),
            ("in the output", {"loss": losses, "sample_ids": ids}, (features,)),
        ):
            module.output = output
            expected = (losses * reducer.contributors[0].sampler.plan.weights[ids]).mean()
            result = module.training_step(data, 0)
            torch.testing.assert_close(result["loss"] if isinstance(result, dict) else result, expected)  # the epoch's weights

            def weightwise_step():
                return module.training_step(data, 0)

            theirs, ours = median_us(official_step, args.repeats), median_us(weightwise_step, args.repeats)
            copy = median_us(losses.clone, args.repeats)
            print(f"| {batch:,} | {where} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.2f}x | {copy:.1f} | {ours / (theirs - copy):.2f}x |")
    # Once per epoch: the plan of the next epoch from the per-sample losses.
    sampler = reducer.contributors[0].sampler

    def weightwise_plan():
        sampler.refresh()
        return sampler.plan

    theirs, ours = median_us(official.prune, 7) / 1e3, median_us(weightwise_plan, 7) / 1e3
    print(f"\nepoch plan (ms, median of 7): official prune {theirs:.0f}, InfoBatchSampler {ours:.0f} ({theirs / ours:.1f}x faster)")


if __name__ == "__main__":
    main()
