import pytest
import torch
from torch.utils.data import DataLoader

from tests.support.models import Classifier, blobs
from tests.support.training import flat_params, trainer
from weightwise.callbacks import PerSampleLossGuard


def test_every_trainer_gets_the_guard_through_the_entry_point():
    assert any(isinstance(cb, PerSampleLossGuard) for cb in trainer().callbacks)


def test_scalar_loss_without_weightwise_callbacks_trains_normally():
    model = Classifier(per_sample=False)
    before = flat_params(model).clone()
    trainer(max_epochs=1).fit(model, DataLoader(blobs(16), batch_size=8))
    assert not torch.equal(before, flat_params(model))


def test_per_sample_loss_without_weightwise_callbacks_names_the_fix():
    with pytest.raises(ValueError, match=r"shape \(8,\).*LossReweighting"):
        trainer(max_steps=1).fit(Classifier(per_sample=True), DataLoader(blobs(16), batch_size=8))
