"""LossReweighting with gradient accumulation on one device, against the documented formulas.

docs/methods.md (the gradient-accumulation row) and ``LossReweighting``'s docstring: with
``accumulate_grad_batches=k`` every micro-batch is weighted when it is trained - by default over its
own (global) batch; with ``statistic="window"`` the range and the softmax's normaliser are taken over
the last ``window`` losses of the run, the current micro-batch included, whatever optimizer step
they belong to - and Lightning divides each micro-batch's weighted mean by k. The expected weights
are written out here from the documented formula, not with ``weightwise.losses.loss_weights``.
"""

import math

import pytest
import torch

from tests.support.models import Classifier, indexed_loader
from tests.support.training import trainer
from weightwise.callbacks import LossReweighting, reducer_of

BATCH, WINDOW, ACCUMULATE, MICRO_BATCHES = 4, 10, 2, 8
DELTA, TEMPERATURE = 1.0, 0.4


class MicroBatches(Classifier):
    """Records every micro-batch's per-sample losses, the weights the reducer gave them and the
    scalar Lightning backpropagated."""

    def __init__(self) -> None:
        super().__init__(lr=0.5)
        self.losses: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.backpropagated: list[float] = []

    def training_step(self, batch, batch_idx):
        losses = super().training_step(batch, batch_idx)
        self.losses.append(losses.detach().double().clone())
        return losses

    def on_before_backward(self, loss):
        self.backpropagated.append(loss.item())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.weights.append(reducer_of(self).scores.weight[batch.sample_id].double())  # float16 in the store


def documented_weights(batch: list[float], window: list[float]) -> list[float]:
    """``w_i = exp(f(l~_i)/r) / mean_window exp(f(l~_j)/r)``, ``l~ = delta (2l - l_max - l_min) /
    max(l_max - l_min, 1e-6)`` over the window's min and max, linupper ``f(l~) = min(l~ + delta, delta)``."""
    low, high = min(window), max(window)

    def exp_score(loss: float) -> float:
        normalised = DELTA * (2 * loss - high - low) / max(high - low, 1e-6)
        return math.exp(min(normalised + DELTA, DELTA) / TEMPERATURE)

    normaliser = sum(exp_score(loss) for loss in window) / len(window)
    return [exp_score(loss) / normaliser for loss in batch]


def test_window_statistic_with_gradient_accumulation_weights_each_micro_batch_against_the_runs_last_losses():
    model = MicroBatches()
    callback = LossReweighting("linupper", warmup_steps=0, statistic="window", window=WINDOW, store_fields=("weight",))
    fit = trainer(max_epochs=1, accumulate_grad_batches=ACCUMULATE, callbacks=[callback])
    fit.fit(model, indexed_loader(BATCH * MICRO_BATCHES, BATCH))

    assert fit.global_step == MICRO_BATCHES // ACCUMULATE and len(model.losses) == MICRO_BATCHES
    run: list[float] = []  # every loss of the run so far, in order
    spans_steps = False
    for micro_batch, losses in enumerate(model.losses):
        batch = losses.tolist()
        run += batch
        window = run[-max(WINDOW, len(batch)) :]  # the last `window` losses, this micro-batch included
        expected = documented_weights(batch, window)
        # The reducer's scalar: the micro-batch's weighted mean, divided by k by Lightning.
        backpropagated = sum(w * loss for w, loss in zip(expected, batch)) / len(batch) / ACCUMULATE
        assert model.backpropagated[micro_batch] == pytest.approx(backpropagated, rel=1e-5), micro_batch
        torch.testing.assert_close(model.weights[micro_batch], torch.tensor(expected, dtype=torch.float64), rtol=2e-3, atol=2e-3)
        # The window is the run's, not the optimizer step's nor the micro-batch's: where it reaches
        # into an earlier step, the weights differ from those of a window that stops at the step.
        step_start = (micro_batch - micro_batch % ACCUMULATE) * BATCH
        this_step = run[step_start:][-max(WINDOW, len(batch)) :]
        if this_step != window and not documented_weights(batch, this_step) == pytest.approx(expected, abs=1e-2):
            spans_steps = True
    assert spans_steps  # the check above can tell the run's window from a per-step one
    assert not torch.allclose(model.weights[-1], torch.ones(BATCH, dtype=torch.float64), atol=1e-2)
