"""Versioned state and one instance per state key."""

import pytest

from tests.support.training import trainer
from weightwise.callbacks import DataPruning, LayerwiseSampling, LossReweighting
from weightwise.core.checkpoints import state_version, with_version


def test_a_newer_state_layout_is_refused_by_name():
    assert state_version(with_version({}, 1), "LossReweighting", 1) == 1
    assert state_version({}, "LossReweighting", 1) == 0  # weightwise 0.1 wrote no version
    with pytest.raises(ValueError, match="upgrade weightwise"):
        state_version(with_version({}, 2), "LossReweighting", 1)


@pytest.mark.parametrize(
    "make", [lambda: LossReweighting("linupper"), DataPruning, lambda: LayerwiseSampling("lisa")], ids=["reweighting", "pruning", "layers"]
)
def test_two_instances_of_one_callback_are_refused_before_their_checkpoint_state_collides(make):
    # Lightning refuses stateful callbacks with one state_key (weightwise's: the class name) when the
    # Trainer is built, so no checkpoint can hold one state for two of them.
    with pytest.raises(RuntimeError, match="more than one stateful callback of type"):
        trainer(callbacks=[make(), make()])
