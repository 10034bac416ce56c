"""A weightwise sampler planned in on_train_start / the first on_train_epoch_start, with DataLoader
workers: mid-epoch resume exact, epoch 0 after a scoring pass on its plan, and Lightning's "dataloader is
not resumable" warning silenced only where the sampler resumes."""

import warnings

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from tests.support.contracts import easy_and_random, reference_lm
from tests.support.models import Classifier, TokenLossLM, blobs
from tests.support.training import flat_params, trainer
from weightwise import IndexedDataset
from weightwise.callbacks import DataPruning
from weightwise.integrations.lightning import NOT_RESUMABLE_WARNING
from weightwise.samplers import InfoBatchSampler, PerplexityBandSampler, reference_perplexity


class Ids(Callback):
    def __init__(self):
        self.ids = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.append((batch["sample_id"] if isinstance(batch, dict) else batch[2]).tolist())


def fit(directory, num_workers, ckpt_path=None, max_steps=-1):
    seed_everything(5)
    model, ids = Classifier(), Ids()
    callbacks = [DataPruning(), ids]
    if max_steps > 0:
        callbacks.append(ModelCheckpoint(dirpath=directory, every_n_train_steps=1, save_top_k=-1, filename="{step}"))
    loader = DataLoader(IndexedDataset(blobs(48)), batch_size=8, sampler=InfoBatchSampler(48, prune_ratio=0.5, num_epochs=2),
                        num_workers=num_workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=2, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=max_steps > 0).fit(
            model, loader, ckpt_path=ckpt_path
        )
    warned = any(str(w.message).startswith(NOT_RESUMABLE_WARNING) for w in caught)
    return model, ids.ids, warned


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_mid_epoch_resume_is_exact_with_workers_and_not_warned(tmp_path, num_workers):
    straight, straight_ids, _ = fit(tmp_path, num_workers)
    fit(tmp_path, num_workers, max_steps=3)
    resumed, resumed_ids, warned = fit(tmp_path, num_workers, ckpt_path=tmp_path / "step=3.ckpt")
    assert resumed_ids == straight_ids[3:]  # the rest of epoch 0, then epoch 1
    assert torch.equal(flat_params(resumed), flat_params(straight))
    assert not warned


def test_the_warning_stays_for_a_dataloader_that_does_not_resume(tmp_path):
    """A plain shuffled DataLoader restarts its epoch on resume: Lightning's warning is right there."""

    def run(ckpt_path=None, max_steps=-1):
        seed_everything(5)
        loader = DataLoader(IndexedDataset(blobs(48)), batch_size=8, shuffle=True)
        callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_epochs=1, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=True).fit(
                Classifier(per_sample=False), loader, ckpt_path=ckpt_path
            )
        return any(str(w.message).startswith(NOT_RESUMABLE_WARNING) for w in caught)

    run(max_steps=2)
    assert run(ckpt_path=tmp_path / "step=2.ckpt")


def test_the_first_epoch_after_a_scoring_pass_trains_its_band_with_workers():
    """PerplexityBandSampler scores before epoch 0; the workers' first indices were drawn before that."""

    def epoch_zero(num_workers):
        sampler = PerplexityBandSampler(24, 0.5, band="high")
        ids = Ids()
        loader = DataLoader(IndexedDataset(easy_and_random(24, 12, 64)), batch_size=4, sampler=sampler, num_workers=num_workers)
        trainer(max_epochs=1, callbacks=[DataPruning(score_fn=reference_perplexity(reference_lm())), ids]).fit(
            TokenLossLM("tokens", layers=2), loader
        )
        return sorted(sum(ids.ids, [])), sorted(sampler.plan.indices.tolist())

    trained, band = epoch_zero(2)
    assert trained == band and epoch_zero(0) == (band, band)
