"""The warning for Lightning's DeepSpeed strategy with gradient accumulation, and its fix.

Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` and ``DeepSpeedEngine.backward``
divides it again; the 2-process proof that the gradients come out at 1/k of DDP's, and that
``DeepSpeedLossDividedOnce`` trains like DDP, is in tests/distributed/test_sharded_language_callbacks.py.
Here: when weightwise's start-up check warns, and that the plugin asks the engine for one division.
"""

import warnings
from types import SimpleNamespace

import pytest

from tests.support.models import Classifier
from tests.support.strategies import CPUDeepSpeedStrategy
from tests.support.training import trainer
from weightwise.integrations.lightning import (
    DeepSpeedAccumulationWarning,
    DeepSpeedLossDividedOnce,
    check_trainer,
)


def test_deepspeed_with_accumulation_warns_naming_the_plugin():
    run = trainer(devices=1, strategy=CPUDeepSpeedStrategy(stage=2), accumulate_grad_batches=2, max_steps=1)
    with pytest.warns(DeepSpeedAccumulationWarning, match=r"divided by 2 twice.*DeepSpeedLossDividedOnce"):
        check_trainer(run)


@pytest.mark.parametrize("accumulate, plugin", [(1, None), (2, DeepSpeedLossDividedOnce("32-true"))], ids=["no-accumulation", "plugin"])
def test_no_warning_without_accumulation_or_with_the_plugin(accumulate, plugin):
    strategy = CPUDeepSpeedStrategy(stage=2, precision_plugin=plugin)
    run = trainer(devices=1, strategy=strategy, accumulate_grad_batches=accumulate, max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeepSpeedAccumulationWarning)
        check_trainer(run)


def test_the_plugin_asks_the_engine_for_one_division():
    calls = []

    class Engine:
        def backward(self, loss, **kwargs):
            calls.append(kwargs)

    module = Classifier()
    module._trainer = SimpleNamespace(model=Engine())  # Lightning's DeepSpeed precision calls trainer.model.backward
    DeepSpeedLossDividedOnce("32-true").backward(1.0, module, None)
    assert calls == [{"scale_wrt_gas": False}]
