"""Per-step cost of ``LayerwiseSampling`` against the same layers frozen by hand.

Model and data: the example ``CausalLM`` (Llama, 8 layers, hidden 128, byte-level) on Python's
standard-library sources, batch 16 x 128 bytes, AdamW, Lightning ``Trainer`` on CPU.

Pairs of runs with identical compute (the same layers train at the same steps):

* ``fixed``: the callback with one period for the whole run, vs the same 2 layers frozen by hand
  (``requires_grad_(False)``) before ``fit``;
* ``K=20``: the callback drawing 2 new layers every 20 steps, vs a hand-written callback that
  replays the same schedule with bare ``requires_grad_`` toggling (no optimizer-state release,
  no logging).

A step's time is measured from one ``on_train_batch_end`` to the next; reported is the mean over
the steps after ``--warmup`` (so the period changes, 1 step in 20, are counted), each pair run ABAB
``--repeats`` times (medians of the repeats' means).
Run: .venv/bin/python benchmarks/layerwise_overhead.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from examples.language_modeling import CausalLM, Windows, stdlib_bytes
from weightwise.callbacks import LayerwiseSampling


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def train_only_layers(model: CausalLM, active: list[int]) -> None:
    for i, layer in enumerate(model.model.model.layers):
        layer.requires_grad_(i in active)


class HandSchedule(Callback):
    """Freeze by hand: at each period start, ``requires_grad_`` on the listed layers, off elsewhere."""

    def __init__(self, schedule: list[list[int]], interval: int) -> None:
        self.schedule, self.interval = schedule, interval

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step % self.interval == 0:
            train_only_layers(pl_module, self.schedule[trainer.global_step // self.interval])


def timed_fit(args: argparse.Namespace, callbacks: list, freeze: list[int] | None = None) -> float:
    pl.seed_everything(0, verbose=False)
    model = CausalLM(hidden_size=128, num_layers=8, lr=3e-4)
    if freeze is not None:
        train_only_layers(model, freeze)
    timer = StepTimer()
    loader = DataLoader(Windows(stdlib_bytes(1_000_000), 128), batch_size=16, shuffle=True)
    pl.Trainer(
        accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer],
    ).fit(model, loader)
    return statistics.mean(timer.times[args.warmup :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for label, interval in (("fixed", args.steps + 1), ("K=20", 20)):
        probe = LayerwiseSampling("lisa", n_layers=2, interval=interval, seed=0)
        timed_fit(args, [probe])  # learn the schedule it draws (a function of the seed only)
        schedule = probe.history
        callback_times, hand_times = [], []
        for _ in range(args.repeats):
            callback_times.append(timed_fit(args, [LayerwiseSampling("lisa", n_layers=2, interval=interval, seed=0)]))
            if label == "fixed":
                hand_times.append(timed_fit(args, [], freeze=schedule[0]))
            else:
                hand_times.append(timed_fit(args, [HandSchedule(schedule, interval)], freeze=schedule[0]))
        cb, hand = statistics.median(callback_times), statistics.median(hand_times)
        rows.append((label, schedule[0], hand, cb))
        print(f"{label}: callback {callback_times} hand {hand_times}", flush=True)

    print(f"\nsteps={args.steps} warmup={args.warmup} repeats={args.repeats} threads={args.threads}")
    print("| schedule | hand-frozen ms/step | LayerwiseSampling ms/step | overhead |")
    print("| --- | ---: | ---: | ---: |")
    for label, first, hand, cb in rows:
        print(f"| {label} (first layers {first}) | {1e3 * hand:.1f} | {1e3 * cb:.1f} | {100 * (cb / hand - 1):+.1f}% |")


if __name__ == "__main__":
    main()
