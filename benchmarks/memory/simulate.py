"""One simulated run: a method trains a fake model for three AdamW steps; peak memory by kind per phase."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import weightwise
from benchmarks.memory.methods import Prepared, Recipe, prepare
from benchmarks.memory.models import SHAPES, Shape
from benchmarks.memory.tracking import Accelerator, FakeAccelerator, tracking
from weightwise.layers import find_layer_stack, optimizer_state_bytes
from weightwise.losses import loss_weights, reduce_token_losses

# Layer-sampling methods switch layers before step 2 and keep them in step 3 (see
# benchmarks.memory.methods.layer_schedule): step 2 shows whether the old layers' optimizer state was
# released, step 3 is the new period's steady state. With two steps, LISA's new layers never hold
# optimizer state during forward/backward, and its peak comes out 6% low (0.66 GiB on the 1.1B model,
# 3.0 GiB on the 7B).
# For the other methods step 3 repeats step 2.
STEPS = 3


@dataclass
class Simulation:
    """What one simulated run measured. Bytes throughout; ``phase_peaks`` maps a phase
    (``"step 2 optimizer"``, ``"step 1 forward/backward"``, ...) to its peak's bytes by kind."""

    model: str
    method: str
    description: str
    parameters: int
    trainable: list[int]  # trainable parameters in each step
    active_layers: list[list[int]] | None  # layer-sampling methods: the layers of each step
    optimizer_state: list[int]  # weightwise.layers.optimizer_state_bytes after each step
    largest_unit_bytes: int  # the largest decoder layer or non-layer parameter (ZeRO-3's gathered unit)
    phase_peaks: dict[str, dict[str, int]]
    seconds: float

    @property
    def peak_phase(self) -> str:
        """The phase of the peak; on a tie the later one (optimizer state is steady by the last step)."""
        return max(reversed(list(self.phase_peaks)), key=lambda phase: sum(self.phase_peaks[phase].values()))

    @property
    def peak(self) -> dict[str, int]:
        """Bytes by kind at the run's peak."""
        return self.phase_peaks[self.peak_phase]

    @property
    def total(self) -> int:
        return sum(self.peak.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "peak_phase": self.peak_phase, "peak": self.peak, "total": self.total}


def train_steps(
    run: Prepared, shape: Shape, accelerator: Accelerator, phase: Callable[[str, str], AbstractContextManager[None]]
) -> tuple[list[int], list[int]]:
    """Train ``run`` for :data:`STEPS` steps on random tokens under bf16 autocast, each part of a step
    inside ``phase(step, stage)`` (``step``: ``"step 1"``...; ``stage``: ``"layer switch"`` (from step 2),
    ``"forward/backward"``, ``"optimizer"``). Returns the trainable parameters and
    :func:`weightwise.layers.optimizer_state_bytes` after each step."""
    trainable, state = [], []
    for index in range(STEPS):
        step = f"step {index + 1}"
        if index > 0:
            with phase(step, "layer switch"):  # release/thaw (and casts) between the steps
                run.before_step(index)
        with phase(step, "forward/backward"):
            ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq), device=accelerator.device)
            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16):
                loss = run.loss(ids)
            loss.backward()
        with phase(step, "optimizer"):
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        trainable.append(sum(p.numel() for p in run.model.parameters() if p.requires_grad))
        state.append(optimizer_state_bytes(run.optimizer))
    return trainable, state


def simulate(model: str, method: str) -> Simulation:
    """Simulate ``method`` (a name as in :mod:`benchmarks.memory.methods`) on the model ``model``
    (a key of :data:`benchmarks.memory.models.SHAPES`): bf16 autocast, fp32 parameters, AdamW,
    :data:`STEPS` steps, batch and sequence length of the shape."""
    start = time.perf_counter()
    recipe = Recipe.parse(method)
    shape = SHAPES[model]
    with FakeAccelerator() as accelerator:
        run = prepare(recipe, shape, accelerator)
        run.before_step(0)  # step 1's layers and dtypes, as a run would load them: not a peak of the run
        with tracking(run.model, run.optimizer) as tracker:

            @contextmanager
            def phase(step: str, stage: str) -> Iterator[None]:
                tracker.step, tracker.stage = step, stage
                yield
                if stage == "layer switch":
                    tracker.track_external(run.model)  # parameters cast by before_step are parameters again
                elif stage == "optimizer":
                    tracker.reset_mod_stats()  # MemTracker refuses a second forward of a module it has stats for

            trainable, state = train_steps(run, shape, accelerator, phase)
        _, stack = find_layer_stack(run.model)
        in_stack = set(stack.parameters())
        outside = [p.numel() * p.element_size() for p in run.model.parameters() if p not in in_stack]
        largest = max(sum(p.numel() * p.element_size() for p in stack[0].parameters()), *outside)
        parameters = sum(p.numel() for p in run.model.parameters())
    return Simulation(
        model=model,
        method=method,
        description=recipe.describe(),
        parameters=parameters,
        trainable=trainable,
        active_layers=run.schedule,
        optimizer_state=state,
        largest_unit_bytes=largest,
        phase_peaks=tracker.phase_peaks,
        seconds=time.perf_counter() - start,
    )


def fake_tensor_support() -> dict[str, str]:
    """Which of weightwise's per-sample functions run on fake tensors: ``"yes"``, or the error and the
    weightwise line that raised it.

    Code that reads a tensor's value in Python (``int(t)``, ``if t.all():``) cannot run on fake tensors,
    and on an accelerator it is a host-device synchronisation each step.
    """
    out = {}
    checks = {
        "weightwise.losses.loss_weights": lambda: loss_weights(torch.linspace(1.0, 3.0, 4), "linupper"),
        "weightwise.losses.reduce_token_losses": lambda: reduce_token_losses(
            torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
        ),
        "weightwise.SampleScoreStore.update": lambda: weightwise.SampleScoreStore().update(
            torch.arange(4), torch.ones(4), step=0
        ),
    }
    for name, check in checks.items():
        with FakeAccelerator():
            try:
                check()
                out[name] = "yes"
            except Exception as error:  # report any failure, whatever its type
                ours = [f for f in traceback.extract_tb(error.__traceback__) if f"{os.sep}weightwise{os.sep}" in f.filename]
                where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno} `{ours[-1].line}`" if ours else ""
                out[name] = f"no: {type(error).__name__}{where}"
    return out


def score_store_bytes(num_samples: int, batch: int) -> int:
    """Accelerator bytes of a :class:`weightwise.SampleScoreStore` of ``num_samples`` samples after one
    update of ``batch`` of them (measured on real tensors; the store follows its losses' device)."""
    store = weightwise.SampleScoreStore(num_samples)
    store.update(torch.arange(batch), torch.rand(batch), step=0, weights=torch.ones(batch))
    fields = (store.loss, store.ema, store.weight, store.count, store.last_step)
    return sum(t.untyped_storage().nbytes() for t in fields)
