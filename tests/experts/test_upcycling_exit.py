"""ExpertUpcycling gives the module's ``on_load_checkpoint`` back when fit raises (docs/architecture.md,
contract 6): Lightning calls no teardown hook then, so a callback restores in ``on_exception`` too."""

import lightning.pytorch as pl
import pytest

from tests.support.models import TinyMoELM, moe_loader
from tests.support.training import trainer
from weightwise.callbacks import ExpertUpcycling


class Fail(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            raise RuntimeError("stop")


def test_an_exception_mid_fit_gives_on_load_checkpoint_back():
    module = TinyMoELM()
    with pytest.raises(RuntimeError, match="stop"):
        trainer(max_epochs=1, callbacks=[ExpertUpcycling(at_step=3), Fail()]).fit(module, moe_loader())
    assert "on_load_checkpoint" not in vars(module)
    callback = ExpertUpcycling(at_step=1)  # a next fit wraps it anew, and upcycles
    trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback]).fit(module, moe_loader())
    assert callback.done and module.model.config.num_experts == 8
