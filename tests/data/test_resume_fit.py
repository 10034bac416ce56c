"""A real Lightning fit over a PackedDocumentStream, checkpointed mid-run and resumed: bit for bit."""

import warnings

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from tests.support.streams import StreamLlama, documents
from tests.support.training import flat_params, trainer
from weightwise.data import PackedDocumentStream, StreamLoader, StreamResume


class ScheduledLlama(StreamLlama):
    """Sizes a schedule from trainer.estimated_stepping_batches: Lightning then builds the training
    DataLoader before it restores the checkpoint, and never hands the loader its state (issue #20550)."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        assert self.trainer.estimated_stepping_batches == self.trainer.max_steps  # builds the loader
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=10)  # the same in every run
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(tmp_path, max_steps, num_workers=0, ckpt_path=None, save_every=None, callbacks=None, module=StreamLlama):
    seed_everything(0)
    model = module()
    loader = StreamLoader(PackedDocumentStream(documents(), 16, seed=1), batch_size=2, num_workers=num_workers)
    extra = [] if save_every is None else [ModelCheckpoint(tmp_path, every_n_train_steps=save_every, save_top_k=-1, filename="{step}")]
    run = trainer(max_steps=max_steps, callbacks=[StreamResume(), *extra] if callbacks is None else callbacks,
                  enable_checkpointing=save_every is not None)
    run.fit(model, loader, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_fit_resumed_mid_stream_ends_with_the_uninterrupted_parameters(tmp_path, num_workers):
    straight = fit(tmp_path, 9, num_workers)
    fit(tmp_path, 3, num_workers, save_every=3)  # a run that stopped after its checkpoint at step 3 (odd: workers rotate)
    resumed = fit(tmp_path, 9, num_workers, ckpt_path=tmp_path / "step=3.ckpt")
    assert len(resumed.seen) == 6
    for got, want in zip(resumed.seen, straight.seen[3:]):
        assert torch.equal(got, want)  # exactly the batches that were next: none lost, none twice
    assert torch.equal(flat_params(resumed), flat_params(straight))


def test_the_position_is_restored_when_the_schedule_built_the_loader_before_the_restore(tmp_path):
    straight = fit(tmp_path, 7, module=ScheduledLlama)
    fit(tmp_path, 3, save_every=3, module=ScheduledLlama)
    resumed = fit(tmp_path, 7, ckpt_path=tmp_path / "step=3.ckpt", module=ScheduledLlama)
    assert [torch.equal(got, want) for got, want in zip(resumed.seen, straight.seen[3:])] == [True] * 4
    assert torch.equal(flat_params(resumed), flat_params(straight))


def test_a_checkpoint_without_stream_resume_is_refused_naming_the_callback(tmp_path):
    with pytest.raises(RuntimeError, match="StreamResume"):
        fit(tmp_path, 4, save_every=2, callbacks=[ModelCheckpoint(tmp_path, every_n_train_steps=2)])


@pytest.mark.parametrize("resumable", [False, True])
def test_resuming_a_stream_without_a_position_warns_that_it_restarts(tmp_path, resumable):
    # no weightwise callback in the fit: the entry point's StreamRestartWarning is in every Trainer
    def run(max_steps, ckpt_path=None):
        seed_everything(0)
        stream = PackedDocumentStream(documents(), 16, seed=1)
        loader = StreamLoader(stream, batch_size=2) if resumable else DataLoader(stream, batch_size=2)
        callbacks = [ModelCheckpoint(tmp_path, every_n_train_steps=2, filename="{step}")]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_steps=max_steps, callbacks=callbacks + [StreamResume()] * resumable, enable_checkpointing=True).fit(
                StreamLlama(), loader, ckpt_path=ckpt_path
            )
        return [str(w.message) for w in caught if "starts again from its beginning" in str(w.message)]

    assert run(2) == []  # a fresh fit
    assert len(run(4, ckpt_path=tmp_path / "step=2.ckpt")) == (0 if resumable else 1)
