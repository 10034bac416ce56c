"""The per-sample loss reducer through real Trainer runs: output forms, bad input, non-finite losses."""

import csv

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from tests.support.models import Classifier, TokenLossLM, blobs, indexed_loader, padded_token_batches
from tests.support.training import trainer
from weightwise import IndexedDataset
from weightwise.callbacks import LossReweighting, SampleReport, SampleWeightCallback
from weightwise.core.store import FIELDS
from weightwise.losses import document_ids_from_positions, loss_weights


class IdFactor(SampleWeightCallback):
    """A stand-in for a sampler's correction: a fixed factor per sample id (1 + id / 10)."""

    needs_sample_ids = True

    def sample_weights(self, losses, sample_ids, trainer):
        return 1.0 + sample_ids.float() / 10


class DictOutput(Classifier):
    """Returns a dict with its own sample ids (no IndexedDataset) and an extra key."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        ids = torch.arange(len(y)) + batch_idx * 8
        return {"loss": losses, "sample_ids": ids, "logits_mean": losses.detach().mean()}


class Broken(Classifier):
    def __init__(self, make_loss):
        super().__init__()
        self.make_loss = make_loss

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return self.make_loss(F.cross_entropy(self.net(x), y, reduction="none"), batch_idx)


def test_dict_output_with_explicit_sample_ids():
    cb = LossReweighting("linupper", warmup_steps=0, store_fields=FIELDS)
    trainer(max_epochs=1, callbacks=[cb]).fit(DictOutput(), DataLoader(blobs(24), batch_size=8))
    assert cb.reducer.scores.count.tolist() == [1] * 24


@pytest.mark.parametrize(
    "make_loss, error, match",
    [
        (lambda losses, i: losses.mean(), ValueError, "reduction='none'"),
        (lambda losses, i: losses[:, None].expand(-1, 5), ValueError, "sequence_loss"),
        (lambda losses, i: losses[:-1], ValueError, "exactly one loss per sample"),
        (lambda losses, i: "oops", TypeError, "loss tensor"),
    ],
)
def test_bad_loss_shapes_fail_with_the_fix(make_loss, error, match):
    with pytest.raises(error, match=match):
        trainer(max_steps=1, callbacks=[LossReweighting(warmup_steps=0)]).fit(Broken(make_loss), indexed_loader(16, 8))


def test_weights_from_the_batch_need_no_sample_ids_but_history_does():
    reweighting = LossReweighting(warmup_steps=0)  # a plain TensorDataset: no ids, and none needed
    trainer(max_steps=2, callbacks=[reweighting]).fit(Classifier(), DataLoader(blobs(16), batch_size=8))
    assert len(reweighting.reducer.scores) == 0  # nothing to keep history by
    with pytest.raises(ValueError, match="IndexedDataset"):  # a callback that keeps per-sample history
        trainer(max_steps=1, callbacks=[IdFactor()]).fit(Classifier(), DataLoader(blobs(16), batch_size=8))


def packed_rows_with_row_ids() -> DataLoader:
    """Rows of 3 packed documents each (``TokenLossLM("packed", document_length=5)``); the batches
    carry the *rows'* dataset indices, which name no document."""
    return DataLoader(IndexedDataset(padded_token_batches().dataset), batch_size=2)


class PackedWithDocumentIds(TokenLossLM):
    """Packed rows whose output names each document: row id * 3 + its index in the row, for every
    document with a valid token, in row order then document order."""

    def __init__(self):
        super().__init__("packed", document_length=5)

    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        documents = batch["sample_id"][:, None] * 3 + document_ids_from_positions(output["position_ids"])
        return {**output, "sample_ids": torch.unique(documents[output["mask"]])}


@pytest.mark.parametrize(
    "callbacks, named",
    [
        (lambda: [LossReweighting(warmup_steps=0, store_fields=("loss",))], "LossReweighting"),
        (lambda: [LossReweighting(warmup_steps=0), SampleReport()], "SampleReport"),
    ],
)
def test_packed_documents_without_their_ids_fail_where_history_needs_them(callbacks, named):
    # The batch's ids are the rows': taking them for the documents would file losses under the wrong
    # samples, and dropping them would keep no history at all - both silently.
    with pytest.raises(ValueError, match=rf"5 packed documents.*but {named} keeps per-sample history.*'sample_ids'"):
        trainer(max_steps=1, callbacks=callbacks()).fit(TokenLossLM("packed", document_length=5), packed_rows_with_row_ids())


def test_packed_documents_train_without_ids_and_keep_history_with_them():
    reweighting, module = LossReweighting("linupper", warmup_steps=0), TokenLossLM("packed", document_length=5)
    trainer(max_steps=2, callbacks=[reweighting]).fit(module, packed_rows_with_row_ids())
    assert len(reweighting.reducer.scores) == 0 and all(torch.isfinite(p).all() for p in module.parameters())
    # With the documents' ids in the output (what the error asks for), every document with a valid
    # token is recorded under its own id: rows 1 and 3 end in padding, so documents 5 and 11 are not.
    reweighting = LossReweighting("linupper", warmup_steps=0, store_fields=("loss", "count"))
    trainer(max_steps=2, callbacks=[reweighting]).fit(PackedWithDocumentIds(), packed_rows_with_row_ids())
    store = reweighting.reducer.scores
    assert store.seen.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert store.count[store.seen].tolist() == [1] * 10 and bool(store.loss[store.seen].isfinite().all())


def poison_second_sample(losses, batch_idx):
    """NaN in the loss value of sample 9 (batch 1, position 1); its gradient path stays finite."""
    if batch_idx == 1:
        losses = losses.masked_fill(torch.arange(len(losses)) == 1, float("nan"))
    return losses


def poison_second_sample_and_its_gradient(losses, batch_idx):
    """NaN produced by a multiplication: its backward is 0 * NaN = NaN, into the shared weights."""
    if batch_idx == 1:
        losses = losses * torch.tensor([1.0, float("nan")] + [1.0] * (len(losses) - 2))
    return losses


def test_nonfinite_loss_raises_with_sample_ids_by_default():
    with pytest.raises(FloatingPointError, match=r"sample ids \[9\].*nonfinite='drop'"):
        trainer(max_epochs=1, callbacks=[LossReweighting(warmup_steps=0)]).fit(Broken(poison_second_sample), indexed_loader(24, 8))


def test_nonfinite_drop_is_counted_logged_and_keeps_parameters_finite(tmp_path):
    cb = LossReweighting("linupper", nonfinite="drop", warmup_steps=0, store_fields=FIELDS)
    model = Broken(poison_second_sample)
    trainer(max_epochs=2, callbacks=[cb], logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(
        model, indexed_loader(24, 8)
    )
    assert cb.reducer.nonfinite_dropped == 2  # one per epoch
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert cb.reducer.scores.count[9] == 0 and cb.reducer.scores.count[8] == 2
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [float(r["weightwise/nonfinite_dropped"]) for r in rows if r.get("weightwise/nonfinite_dropped")]
    assert logged[-1] == 2.0


def test_dropped_sample_that_poisons_gradients_is_not_silent():
    with pytest.raises(FloatingPointError, match="gradients are non-finite"):
        trainer(max_epochs=1, callbacks=[LossReweighting(nonfinite="drop", warmup_steps=0)]).fit(
            Broken(poison_second_sample_and_its_gradient), indexed_loader(24, 8)
        )


def test_all_nonfinite_batch_raises_even_when_dropping():
    def all_nan(losses, batch_idx):
        return losses * float("nan")

    with pytest.raises(FloatingPointError, match="every sample"):
        trainer(max_steps=1, callbacks=[LossReweighting(nonfinite="drop", warmup_steps=0)]).fit(Broken(all_nan), indexed_loader(16, 8))


def test_manual_optimization_is_refused_with_the_alternative():
    class Manual(Classifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(MisconfigurationException, match="weighted_mean"):
        trainer(max_steps=1, callbacks=[LossReweighting(warmup_steps=0)]).fit(Manual(), indexed_loader(16, 8))


def test_callbacks_must_agree_on_shared_options():
    with pytest.raises(MisconfigurationException, match="disagree on nonfinite"):
        trainer(max_steps=1, callbacks=[LossReweighting(warmup_steps=0), IdFactor(nonfinite="drop")]).fit(
            Classifier(), indexed_loader(16, 8)
        )


def test_weighting_callbacks_multiply_into_one_weight():
    reweighting, correction = LossReweighting("linupper", warmup_steps=0, store_fields=FIELDS), IdFactor()
    model = Classifier(lr=0.0)
    trainer(max_steps=1, callbacks=[reweighting, correction]).fit(model, indexed_loader(8, 8))
    x, y = blobs(8).tensors
    losses = F.cross_entropy(model.net(x), y, reduction="none").detach()
    expected = loss_weights(losses, "linupper") * (1.0 + torch.arange(8) / 10)
    torch.testing.assert_close(reweighting.reducer.scores.weight.float(), expected, rtol=1e-3, atol=1e-3)  # float16 in the store
    assert reweighting.reducer is correction.reducer
