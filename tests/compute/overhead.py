"""ComputeBudget's cost per training step on tiny Llamas (CPU): fits with and without it, alternated.

Usage: python -m tests.compute.overhead [--steps 200] [--repeats 3]
Prints the median CPU time (this thread) per optimizer step of each configuration and the difference.
"""

import argparse
import statistics
import time

import torch
from lightning.pytorch.callbacks import Callback

from tests.support.models import TinyLlama, token_batches
from tests.support.training import trainer
from weightwise.compute import ComputeBudget


class StepTimes(Callback):
    """CPU time of this thread for each training batch (start to end): unlike wall time, it is not inflated by
    other processes on a shared machine."""

    def __init__(self):
        self.times = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.thread_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.thread_time() - self.start)


def step_time(layers: int, length: int, steps: int, budget: bool) -> float:
    timer = StepTimes()
    callbacks = [timer, ComputeBudget(flops=1e18)] if budget else [timer]
    model = TinyLlama(layers=layers)
    trainer(max_steps=steps, max_epochs=-1, callbacks=callbacks).fit(model, token_batches(64, length))
    return statistics.median(timer.times[5:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for layers, length in ((2, 16), (6, 64)):
        runs = {False: [], True: []}
        for _ in range(args.repeats):
            for budget in (False, True):
                runs[budget].append(step_time(layers, length, args.steps, budget))
        plain, metered = min(runs[False]), min(runs[True])
        print(
            f"layers={layers} batch=2x{length}: plain {plain * 1e3:.2f} ms/step, with ComputeBudget {metered * 1e3:.2f} ms/step,"
            f" overhead {(metered - plain) * 1e3:+.2f} ms ({(metered / plain - 1) * 100:+.1f}%)"
        )


if __name__ == "__main__":
    main()
