import csv
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from tests.support.models import Classifier, TokenLossLM, blobs, indexed_loader, padded_token_batches
from tests.support.training import flat_params, trainer
from weightwise.callbacks import LossReweighting, SampleWeightCallback, reducer_of
from weightwise.core.store import FIELDS
from weightwise.losses import loss_weights


def test_uniform_reproduces_plain_mean_training_exactly():
    seed_everything(7)
    plain = Classifier(per_sample=False, optimizer="adamw", lr=0.01)
    trainer(max_epochs=3).fit(plain, DataLoader(blobs(96), batch_size=10, shuffle=True))

    seed_everything(7)
    weighted = Classifier(per_sample=True, optimizer="adamw", lr=0.01)
    trainer(max_epochs=3, callbacks=[LossReweighting("uniform", warmup_steps=0)]).fit(weighted, indexed_loader(96, 10, shuffle=True))

    assert torch.equal(flat_params(plain), flat_params(weighted))


def test_linupper_changes_training_and_applies_weights_of_the_batch():
    seed_everything(0)
    model = Classifier()
    init = Classifier()
    init.load_state_dict(model.state_dict())
    cb = LossReweighting("linupper", warmup_steps=0, store_fields=FIELDS)
    fit_trainer = trainer(max_steps=1, callbacks=[cb])
    fit_trainer.fit(model, indexed_loader(16, 16))

    # Same single step by hand: weighted mean with the paper's weights on the batch's losses.
    x, y = blobs(16).tensors
    losses = torch.nn.functional.cross_entropy(init.net(x), y, reduction="none")
    w = loss_weights(losses, "linupper")
    (losses * w).mean().backward()
    with torch.no_grad():
        expected = torch.cat([(p - 0.1 * p.grad).flatten() for p in init.parameters()])
    assert torch.allclose(flat_params(model), expected, atol=1e-6)
    assert not torch.allclose(w, torch.ones_like(w))
    # The training_step wrapper is gone after fit, the module is plain again.
    assert "training_step" not in model.__dict__ and reducer_of(model) is None


def test_score_store_sees_every_sample_with_its_own_loss():
    seed_everything(0)
    model = Classifier(lr=0.0)  # frozen model: each stored loss must equal the sample's own loss
    cb = LossReweighting("quadratic", warmup_steps=0, store_fields=FIELDS)
    trainer(max_epochs=2, callbacks=[cb]).fit(model, indexed_loader(40, 8, shuffle=True))
    store = cb.reducer.scores
    assert len(store) == 40 and store.count.tolist() == [2] * 40
    x, y = blobs(40).tensors
    own = torch.nn.functional.cross_entropy(model.net(x), y, reduction="none").detach()
    assert torch.allclose(store.loss, own, atol=1e-6)
    assert torch.isfinite(store.weight).all() and (store.weight >= 0).all()


def test_weight_statistics_are_logged(tmp_path):
    cb = LossReweighting("extremes", warmup_steps=0, store_fields=FIELDS)
    trainer(max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=1, callbacks=[cb]).fit(
        Classifier(), indexed_loader(32, 8)
    )
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    means = [float(r["weightwise/weight_mean"]) for r in rows if r.get("weightwise/weight_mean")]
    maxima = [float(r["weightwise/weight_max"]) for r in rows if r.get("weightwise/weight_max")]
    assert len(means) == 4 and all(abs(m - 1) < 1e-5 for m in means)
    assert all(m > 1 for m in maxima)


def test_wandb_offline_run_gets_weight_histogram(tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=tmp_path, offline=True, project="weightwise-tests")
    trainer(max_epochs=1, logger=logger, log_every_n_steps=1, callbacks=[LossReweighting("linupper", warmup_steps=0)]).fit(
        Classifier(), indexed_loader(16, 8)
    )
    wandb.finish()
    # W&B's service process writes the offline run file asynchronously: give it time to flush.
    deadline = time.monotonic() + 30
    content = b""
    while time.monotonic() < deadline and b"weightwise/weights" not in content:
        run_files = list(tmp_path.rglob("*.wandb"))
        content = run_files[0].read_bytes() if run_files else b""
        time.sleep(0.2)
    assert run_files, "no offline W&B run was written"
    assert b"weightwise/weights" in content


def test_resume_from_checkpoint_continues_identically(tmp_path):
    def run(max_epochs, ckpt_path=None, callbacks=()):
        seed_everything(3)
        model = Classifier()
        cb = LossReweighting("linupper", warmup_steps=0, store_fields=FIELDS)
        trainer(max_epochs=max_epochs, callbacks=[cb, *callbacks], enable_checkpointing=bool(callbacks)).fit(
            model, indexed_loader(24, 8), ckpt_path=ckpt_path
        )
        return model, cb.reducer.scores

    straight, straight_scores = run(4)
    checkpointing = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    run(2, callbacks=[checkpointing])
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["weightwise"]["scores"]["count"].tolist() == [2] * 24
    resumed, resumed_scores = run(4, ckpt_path=tmp_path / "last.ckpt")

    assert torch.allclose(flat_params(straight), flat_params(resumed))
    assert resumed_scores.count.tolist() == [4] * 24
    assert torch.allclose(resumed_scores.ema, straight_scores.ema)


def test_resume_with_other_settings_is_refused(tmp_path):
    checkpointing = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, enable_checkpointing=True, callbacks=[LossReweighting("linupper", warmup_steps=0), checkpointing]).fit(
        Classifier(), indexed_loader(16, 8)
    )
    with pytest.raises(ValueError, match="resume with the saved settings"):
        trainer(max_epochs=2, callbacks=[LossReweighting("linupper", delta=2.0, warmup_steps=0)]).fit(
            Classifier(), indexed_loader(16, 8), ckpt_path=tmp_path / "last.ckpt"
        )


@pytest.mark.parametrize("kwargs", [{"strategy": "cubic"}, {"temperature": 0.0}, {"nonfinite": "ignore"}])
def test_bad_configuration(kwargs):
    with pytest.raises(ValueError):
        LossReweighting(**kwargs)


class WeightsPerStep(pl.Callback):
    """The combined weights the reducer gave each step's samples (read back from the score store)."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(reducer_of(pl_module).scores.weight[batch.sample_id].float())  # float16 in the store


def test_no_reweighting_during_the_warmup_then_the_strategy():
    record = WeightsPerStep()
    reweighting = LossReweighting("linupper", warmup_steps=2, store_fields=FIELDS)
    trainer(max_steps=4, callbacks=[reweighting, record]).fit(Classifier(lr=0.0), indexed_loader(32, 8))
    assert all(torch.equal(w, torch.ones(8)) for w in record.weights[:2])
    assert all(not torch.allclose(w, torch.ones(8)) for w in record.weights[2:])


def test_temperature_warmup_weights_nearly_uniformly_first():
    record = WeightsPerStep()
    reweighting = LossReweighting("linupper", warmup_steps=1, warmup="temperature", warmup_temperature=100.0, store_fields=FIELDS)
    model = Classifier(lr=0.0)
    trainer(max_steps=2, callbacks=[reweighting, record]).fit(model, indexed_loader(16, 8))
    x, y = blobs(16).tensors
    losses = torch.nn.functional.cross_entropy(model.net(x), y, reduction="none").detach()
    torch.testing.assert_close(record.weights[0], loss_weights(losses[:8], "linupper", temperature=100.0), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(record.weights[1], loss_weights(losses[8:], "linupper"), rtol=1e-3, atol=1e-3)


def test_window_statistic_reweights_micro_batches_of_one_sample():
    per_batch, windowed = WeightsPerStep(), WeightsPerStep()
    trainer(max_steps=6, callbacks=[LossReweighting("linupper", warmup_steps=0, store_fields=FIELDS), per_batch]).fit(
        Classifier(lr=0.0), indexed_loader(6, 1)
    )
    assert all(torch.equal(w, torch.ones(1)) for w in per_batch.weights)  # one sample: always weight 1
    reweighting = LossReweighting("linupper", warmup_steps=0, statistic="window", window=4, store_fields=FIELDS)
    trainer(max_steps=6, callbacks=[reweighting, windowed]).fit(Classifier(lr=0.0), indexed_loader(6, 1))
    assert len({round(float(w), 4) for w in windowed.weights[1:]}) > 1  # relative to the recent window
    assert reweighting._recent.numel() == 4


def test_window_smaller_than_the_batch_still_covers_the_whole_batch():
    record = WeightsPerStep()
    reweighting = LossReweighting("linupper", warmup_steps=0, statistic="window", window=3, store_fields=FIELDS)
    model = Classifier(lr=0.0)
    trainer(max_steps=1, callbacks=[reweighting, record]).fit(model, indexed_loader(8, 8))
    x, y = blobs(8).tensors
    losses = torch.nn.functional.cross_entropy(model.net(x), y, reduction="none").detach()
    torch.testing.assert_close(record.weights[0], loss_weights(losses, "linupper", temperature=0.4), rtol=1e-3, atol=1e-3)
    assert reweighting._recent.numel() == 3  # only `window` losses are carried to the next step


def test_uniform_with_gradient_accumulation_is_plain_training():
    seed_everything(7)
    plain = Classifier(per_sample=False, optimizer="adamw", lr=0.01)
    trainer(max_epochs=2, accumulate_grad_batches=3).fit(plain, DataLoader(blobs(96), batch_size=8, shuffle=True))
    seed_everything(7)
    weighted = Classifier(per_sample=True, optimizer="adamw", lr=0.01)
    trainer(max_epochs=2, accumulate_grad_batches=3, callbacks=[LossReweighting("uniform")]).fit(
        weighted, indexed_loader(96, 8, shuffle=True)
    )
    assert torch.equal(flat_params(plain), flat_params(weighted))


def test_token_losses_of_padded_sequences_train_like_the_plain_language_model_loss():
    """uniform + token losses with a mask: sequences weighted by token share = HF's token mean."""
    plain, tokens = TokenLossLM("plain"), TokenLossLM("tokens")
    trainer(max_steps=3).fit(plain, padded_token_batches())
    reweighting = LossReweighting("uniform")
    trainer(max_steps=3, callbacks=[reweighting]).fit(tokens, padded_token_batches())
    torch.testing.assert_close(flat_params(tokens), flat_params(plain))
    assert len(reweighting.reducer.scores) == 0  # a stream needs no ids: nothing was kept per sample


def test_packed_documents_are_weighted_one_by_one():
    class Seen(SampleWeightCallback):
        def __init__(self):
            super().__init__()
            self.counts = []

        def sample_weights(self, losses, sample_ids, trainer):
            self.counts.append((losses.numel(), sample_ids))

    seen = Seen()
    module = TokenLossLM("packed", document_length=5)
    trainer(max_steps=2, callbacks=[LossReweighting("linupper", warmup_steps=0), seen]).fit(module, padded_token_batches())
    # rows of 15 predicted tokens = 3 documents of 5; the second row's labels end at token 9, so its
    # third document has no valid token and is left out: 3 + 2 documents in the first batch
    assert seen.counts[0] == (5, None) and torch.isfinite(flat_params(module)).all()


def test_token_losses_without_a_mask_fail_with_the_fix():
    class NoMask(TokenLossLM):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    with pytest.raises(ValueError, match="'mask'|mask"):
        trainer(max_steps=1, callbacks=[LossReweighting(warmup_steps=0)]).fit(NoMask(), padded_token_batches())


def test_the_score_store_is_sized_to_the_training_set_not_grown_from_shuffled_ids():
    reweighting = LossReweighting("uniform", store_fields=("loss",))
    trainer(max_epochs=1, callbacks=[reweighting]).fit(Classifier(), indexed_loader(100, 8, shuffle=True))
    store = reweighting.reducer.scores
    assert len(store) == 100 and store.nbytes == 100 * 4 and bool(store.seen.all())


def test_the_warmup_phase_is_logged_at_every_step(tmp_path):
    record = WeightsPerStep()
    reweighting = LossReweighting("linupper", warmup_steps=2, store_fields=FIELDS)
    fit = trainer(max_steps=5, callbacks=[reweighting, record], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    fit.fit(Classifier(lr=0.0), indexed_loader(40, 8))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    phase = [float(r["weightwise/reweighting_active"]) for r in rows if r.get("weightwise/reweighting_active")]
    assert phase == [0.0, 0.0, 1.0, 1.0, 1.0]
    unweighted = [bool(torch.equal(w, torch.ones(8))) for w in record.weights]
    assert unweighted == [p == 0.0 for p in phase]  # the logged phase is the one the weights had


@pytest.mark.parametrize(
    "warmup_steps, limits, warns",
    [
        (1000, dict(max_steps=5), True),  # the reference's 1000-step warm-up, a 5-step run
        (1000, dict(max_epochs=2), True),  # 2 epochs of 4 batches: Lightning's estimate, 8 steps
        (4, dict(max_epochs=2, accumulate_grad_batches=2), True),  # 4 optimizer steps
        (5, dict(max_steps=5), True),
        (4, dict(max_steps=5), False),  # the last step is weighted
        (0, dict(max_steps=5), False),
    ],
)
def test_a_warmup_that_covers_the_whole_run_is_warned_about(warmup_steps, limits, warns, recwarn):
    fit = trainer(callbacks=[LossReweighting("linupper", warmup_steps=warmup_steps)], **{"max_epochs": -1, **limits})
    fit.fit(Classifier(), indexed_loader(32, 8))
    messages = [str(w.message) for w in recwarn if "covers the whole run" in str(w.message)]
    assert len(messages) == int(warns)
    if warns:
        assert f"warmup_steps={warmup_steps}" in messages[0] and f"({int(fit.estimated_stepping_batches)} optimizer steps)" in messages[0]


def test_an_exception_mid_fit_gives_training_step_back():
    class Fail(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                raise RuntimeError("stop")

    model = Classifier()
    with pytest.raises(RuntimeError, match="stop"):
        trainer(max_epochs=1, callbacks=[LossReweighting("linupper", warmup_steps=0), Fail()]).fit(model, indexed_loader(32, 8))
    assert "training_step" not in vars(model) and reducer_of(model) is None
    # A next fit installs a reducer of its own (a stale one would hold the failed fit's trainer).
    reweighting = LossReweighting("linupper", warmup_steps=0, store_fields=("count",))
    trainer(max_epochs=1, callbacks=[reweighting]).fit(model, indexed_loader(32, 8))
    assert reweighting.reducer.scores.count.tolist() == [1] * 32
