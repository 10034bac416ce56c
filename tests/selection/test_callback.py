"""DataPruning with real Trainer runs: shorter epochs, corrections, ledger, composition, resume."""

import csv
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tests.support.models import Classifier, blobs, indexed_loader
from tests.support.training import flat_params, trainer
from weightwise import IndexedDataset, SampleScoreStore
from weightwise.callbacks import DataPruning, LossReweighting
from weightwise.core.store import FIELDS
from weightwise.losses import el2n, grand, loss_weights
from weightwise.samplers import (
    ImportanceSampler,
    InfoBatchSampler,
    RandomSubsetSampler,
    ScorePruningSampler,
)


class Recorder(Callback):
    """Which sample ids each epoch trained on, and how many batches Lightning thought it had."""

    def __init__(self):
        self.ids, self.num_batches, self.validations = {}, {}, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.setdefault(trainer.current_epoch, []).extend(batch.sample_id.tolist())
        self.num_batches[trainer.current_epoch] = trainer.num_training_batches

    def on_validation_epoch_end(self, trainer, pl_module):
        self.validations += 1


def test_infobatch_epochs_shrink_validation_runs_and_ledger_is_logged(tmp_path):
    sampler = InfoBatchSampler(64, prune_ratio=0.5)
    recorder = Recorder()
    pruning = DataPruning()
    fit = trainer(
        max_epochs=8,
        callbacks=[pruning, recorder],
        logger=CSVLogger(tmp_path),
        enable_progress_bar=True,
        num_sanity_val_steps=0,
    )
    fit.fit(Classifier(), indexed_loader(64, 8, sampler=sampler), indexed_loader(16, 8))

    sizes = [len(recorder.ids[e]) for e in range(8)]
    assert sizes[0] == 64 and sizes[7] == 64  # first epoch full, last epoch annealed (7 >= 0.875 * 8)
    assert all(size < 64 for size in sizes[1:7])
    assert [recorder.num_batches[e] for e in range(8)] == [-(-s // 8) for s in sizes]
    assert recorder.validations == 8  # validation still runs at the end of every (shorter) epoch
    assert sampler.num_epochs == 8  # taken from max_epochs
    assert pruning.ledger["samples_visited"] == sum(sizes) and pruning.ledger["samples_full"] == 8 * 64

    rows = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r.get("weightwise/epoch_samples")]
    assert [float(r["weightwise/epoch_samples"]) for r in rows] == [float(s) for s in sizes]
    assert float(rows[-1]["weightwise/samples_skipped_total"]) == 8 * 64 - sum(sizes)
    # the ledger's running totals, logged by the callback itself (no script needed)
    assert [float(r["weightwise/ledger/samples_visited"]) for r in rows] == [float(sum(sizes[: e + 1])) for e in range(8)]
    assert float(rows[-1]["weightwise/ledger/samples_full"]) == 8 * 64 and float(rows[-1]["weightwise/ledger/epochs"]) == 8
    assert {f"weightwise/ledger/{key}" for key in pruning.ledger} <= set(rows[-1])


@pytest.mark.slow  # W&B's service takes ~7 s to start; the CSV test above checks the same metrics in make quick
def test_the_ledger_lands_in_the_wandb_summary_without_any_script(tmp_path):
    """README: DataPruning's ledger goes to the run's W&B summary (weightwise/ledger/*) - from the library."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=tmp_path, offline=True, project="weightwise-tests")
    pruning = DataPruning()
    sampler = RandomSubsetSampler(32, fraction=0.5)
    try:
        trainer(max_epochs=2, logger=logger, callbacks=[pruning]).fit(Classifier(), indexed_loader(32, 8, sampler=sampler))
        summary = dict(logger.experiment.summary)
    finally:
        wandb.finish()
    assert summary["weightwise/ledger/samples_visited"] == pruning.ledger["samples_visited"] == 32
    assert summary["weightwise/ledger/samples_full"] == 64 and summary["weightwise/ledger/epochs"] == 2


def test_infobatch_correction_reaches_the_loss_and_composes_with_reweighting():
    sampler = InfoBatchSampler(32, prune_ratio=0.5, num_epochs=10)
    pruning, reweighting = DataPruning(), LossReweighting("linupper", warmup_steps=0, store_fields=FIELDS)
    model = Classifier(lr=0.0)  # frozen model: losses stay the same, so weights can be recomputed
    trainer(max_epochs=2, callbacks=[reweighting, pruning]).fit(model, indexed_loader(32, 32, sampler=sampler))
    plan = sampler.plan
    store = pruning.reducer.scores
    kept = plan.indices
    expected = loss_weights(store.loss[kept], "linupper") * plan.weights[kept]
    torch.testing.assert_close(store.weight[kept].float(), expected, rtol=1e-3, atol=1e-3)  # the store keeps float16
    assert (plan.weights[kept] > 1.0).any()  # some kept well-learned samples were up-weighted


@pytest.mark.parametrize(
    "make_sampler",
    [
        lambda: RandomSubsetSampler(64, 0.25),
        lambda: ImportanceSampler(64, 0.5),
        lambda: ScorePruningSampler(64, 0.5, score="el2n"),
    ],
)
def test_every_policy_trains_with_fewer_samples(make_sampler):
    sampler = make_sampler()
    recorder = Recorder()
    pruning = DataPruning()
    trainer(max_epochs=3, callbacks=[pruning, recorder]).fit(Classifier(el2n=True), indexed_loader(64, 8, sampler=sampler))
    assert pruning.ledger["samples_visited"] < 3 * 64
    assert sum(len(v) for v in recorder.ids.values()) == pruning.ledger["samples_visited"]
    assert torch.isfinite(pruning.reducer.scores.signal("el2n")).sum() > 0


def test_without_a_weightwise_sampler_the_error_names_the_fix():
    with pytest.raises(MisconfigurationException, match="InfoBatchSampler"):
        trainer(max_epochs=1, callbacks=[DataPruning()]).fit(Classifier(), indexed_loader(16, 8))


def test_double_sharding_by_lightning_is_refused():
    from torch.utils.data import DataLoader

    sampler = RandomSubsetSampler(16, 0.5, num_replicas=1, rank=0)
    wrapped = DataLoader(range(16), sampler=DistributedSamplerWrapper(sampler, num_replicas=2, rank=0))
    with pytest.raises(MisconfigurationException, match="use_distributed_sampler=False"):
        DataPruning.find_sampler(SimpleNamespace(train_dataloader=wrapped))


def test_resume_continues_the_same_subsets_weights_and_scores(tmp_path):
    def run(max_epochs, ckpt_path=None, checkpoint_dir=None):
        seed_everything(5)
        model = Classifier()
        sampler = InfoBatchSampler(48, prune_ratio=0.5, num_epochs=6)
        recorder, pruning = Recorder(), DataPruning()
        callbacks = [pruning, recorder]
        if checkpoint_dir:
            callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True))
        trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=bool(checkpoint_dir)).fit(
            model, indexed_loader(48, 8, sampler=sampler), ckpt_path=ckpt_path
        )
        return model, recorder, pruning

    straight, straight_ids, straight_pruning = run(6)
    run(3, checkpoint_dir=tmp_path)
    resumed, resumed_ids, resumed_pruning = run(6, ckpt_path=tmp_path / "last.ckpt")

    assert sorted(resumed_ids.ids) == [3, 4, 5]
    for epoch in (3, 4, 5):
        assert resumed_ids.ids[epoch] == straight_ids.ids[epoch], epoch
    assert len(straight_ids.ids[3]) < 48  # the resumed epochs are pruned ones, so the test has teeth
    assert torch.allclose(flat_params(resumed), flat_params(straight))
    assert resumed_pruning.ledger["samples_visited"] == straight_pruning.ledger["samples_visited"]


@pytest.fixture(scope="module")
def mid_epoch_checkpoints(tmp_path_factory):
    """An uninterrupted pruned run, and a copy of it that saved a checkpoint after every step."""
    directory = tmp_path_factory.mktemp("every_step")

    def run(ckpt_path=None, save=False, max_steps=-1):
        seed_everything(5)
        model, recorder, pruning = Classifier(), Recorder(), DataPruning()
        callbacks = [pruning, recorder]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=directory, every_n_train_steps=1, save_top_k=-1, filename="{step}"))
        trainer(max_epochs=4, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=save).fit(
            model, indexed_loader(48, 8, sampler=InfoBatchSampler(48, prune_ratio=0.5, num_epochs=4)), ckpt_path=ckpt_path
        )
        return model, recorder, pruning

    run(save=True, max_steps=10)
    return run, run(), directory


# 6 batches in epoch 0 (full), then pruned epochs: mid epoch 0, its last batch, mid epoch 1 (pruned).
@pytest.mark.parametrize("step", [3, 6, 8])
def test_resume_from_a_mid_epoch_checkpoint_trains_exactly_the_rest_of_the_epoch(mid_epoch_checkpoints, step):
    run, (straight, straight_ids, straight_pruning), directory = mid_epoch_checkpoints
    resumed, resumed_ids, resumed_pruning = run(ckpt_path=directory / f"step={step}.ckpt")
    for epoch, ids in resumed_ids.ids.items():
        assert ids == straight_ids.ids[epoch][len(straight_ids.ids[epoch]) - len(ids) :], epoch
    trained = sum(len(ids) for ids in resumed_ids.ids.values())
    assert trained == sum(len(ids) for ids in straight_ids.ids.values()) - 8 * step  # nothing twice, nothing lost
    assert torch.equal(flat_params(resumed), flat_params(straight))
    assert resumed_pruning.ledger["samples_visited"] == straight_pruning.ledger["samples_visited"]


class ScheduledClassifier(Classifier):
    """LR decays linearly over trainer.estimated_stepping_batches, stepped every optimizer step."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_step_sized_schedule_max_steps_and_mid_epoch_validation_follow_pruned_epochs():
    recorder = Recorder()
    model = ScheduledClassifier()
    fit = trainer(
        max_epochs=10,
        max_steps=30,
        val_check_interval=0.5,
        num_sanity_val_steps=0,
        callbacks=[DataPruning(), recorder],
    )
    fit.fit(model, indexed_loader(64, 8, sampler=RandomSubsetSampler(64, 0.5)), indexed_loader(16, 8))
    assert fit.global_step == 30  # max_steps still ends the run: 4 steps per pruned epoch
    assert [len(ids) for ids in recorder.ids.values()][:7] == [32] * 7
    assert recorder.validations == 2 * 7 + 1  # twice per 4-batch epoch, once in the last partial epoch
    # With max_steps set, estimated_stepping_batches is max_steps: the schedule ends exactly with the run.
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_data_diet_scores_the_training_set_by_a_forward_only_pass_in_eval_mode():
    model = Classifier(el2n=True, lr=0.0)  # frozen: the pass' scores must equal el2n of the model in eval mode
    model.net.insert(1, torch.nn.Dropout(0.5))  # eval mode or not shows in the scores
    sampler = ScorePruningSampler(64, 0.5, score="el2n", warmup_epochs=1, rescore_every=2)
    pruning, recorder = DataPruning(), Recorder()
    trainer(max_epochs=5, callbacks=[pruning, recorder]).fit(model, indexed_loader(64, 8, sampler=sampler))
    assert [len(recorder.ids[e]) for e in range(5)] == [64, 32, 32, 32, 32]  # the passes are not training epochs
    assert pruning.ledger["samples_scored"] == 2 * 64  # before epochs 1 and 3
    x, y = blobs(64).tensors
    model.eval()
    expected = el2n(model.net(x), y)
    # the subset is the top half by the eval-mode EL2N of the pass (the training steps' dropout scores differ)
    assert sorted(sampler.plan.indices.tolist()) == sorted(torch.argsort(expected, descending=True)[:32].tolist())


class Augmented(torch.utils.data.Dataset):
    """A training set with a random augmentation: every read adds fresh noise to the features."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x + 3.0 * torch.randn_like(x), y


def test_scoring_passes_read_the_unaugmented_view_like_the_references():
    """Data Diet and CCS score the training set without augmentation: with scoring_dataset= the pass
    reads it (the training set's ids added), so the scores are the un-augmented data's losses
    ("eval_loss": only passes write it); without it the pass reads the augmenting training set and
    says so."""
    clean = blobs(64)
    x, y = clean.tensors
    for scoring_dataset in (clean, None):
        model = Classifier(el2n=True, lr=0.0)  # frozen: scores are a function of the data read
        sampler = ScorePruningSampler(64, 0.5, score="el2n", warmup_epochs=1)
        pruning = DataPruning(scoring_dataset=scoring_dataset)
        loader = torch.utils.data.DataLoader(IndexedDataset(Augmented(clean)), batch_size=8, sampler=sampler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_epochs=2, callbacks=[pruning]).fit(model, loader)
        warned = [w for w in caught if "scoring_dataset" in str(w.message)]
        model.eval()
        with torch.no_grad():
            expected = F.cross_entropy(model.net(x), y, reduction="none")
        scores = pruning.reducer.scores.signal("eval_loss")
        if scoring_dataset is not None:
            torch.testing.assert_close(scores, expected)
            assert not warned
        else:
            assert (scores - expected).abs().max() > 0.05 and len(warned) == 1


def test_rescored_el2n_under_label_noise_collapses_and_the_sampler_says_so():
    """Data Diet's top-k EL2N rescored every epoch with skip_hardest=0 on 30% flipped labels keeps
    mostly the flipped samples, fits them and unlearns the clean ones; the pass after that shows a
    higher training error (EL2N > 1 implies a misclassification) and the sampler warns, naming
    skip_hardest. With skip_hardest=0.3 the run learns the clean labels and nothing is said."""
    n = 256
    x, y = blobs(n).tensors
    gen = torch.Generator().manual_seed(1)
    flipped = torch.rand(n, generator=gen) < 0.3
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + torch.randint(1, 3, (int(flipped.sum()),), generator=gen)) % 3
    accuracy, warned = {}, {}
    for skip in (0.0, 0.3):
        seed_everything(0)
        model = Classifier(el2n=True, lr=0.3)
        sampler = ScorePruningSampler(n, 0.5, score="el2n", warmup_epochs=1, rescore_every=1, skip_hardest=skip)
        data = torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(x, noisy)), batch_size=32, sampler=sampler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_epochs=4, callbacks=[DataPruning()]).fit(model, data)
        warned[skip] = [str(w.message) for w in caught if "skip_hardest=" in str(w.message)]
        with torch.no_grad():
            accuracy[skip] = (model.net(x).argmax(1) == y).float().mean().item()
    assert accuracy[0.3] > accuracy[0.0] + 0.3  # the collapse is real
    assert len(warned[0.0]) == 1 and "misclassifies" in warned[0.0][0] and warned[0.3] == []


def test_the_augmentation_check_compares_reads_by_value_and_draws_nothing():
    from weightwise.selection.scoring import reads_differ

    nan_features = torch.utils.data.TensorDataset(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))
    assert not reads_differ(nan_features)  # a nan read twice is the same read
    assert not reads_differ([{"text": "a", "ids": torch.tensor([1, 2])}])
    state = torch.random.get_rng_state()
    assert reads_differ(Augmented(blobs(4)))
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is untouched


def test_a_scoring_dataset_of_another_length_is_refused():
    sampler = ScorePruningSampler(64, 0.5, score="el2n", warmup_epochs=1)
    with pytest.raises(MisconfigurationException, match="same order, without random augmentation"):
        trainer(max_epochs=1, callbacks=[DataPruning(scoring_dataset=blobs(32))]).fit(
            Classifier(el2n=True), indexed_loader(64, 8, sampler=sampler)
        )


def test_grand_scores_through_a_score_function():
    def grand_scores(module, batch):
        x, y = batch[0], batch[1]
        return {"grand": grand(module.net, lambda call, xi, yi: F.cross_entropy(call(xi), yi), x, y)}

    sampler = ScorePruningSampler(32, 0.25, score="grand", warmup_epochs=1)
    pruning = DataPruning(score_fn=grand_scores)
    trainer(max_epochs=2, callbacks=[pruning]).fit(Classifier(), indexed_loader(32, 8, sampler=sampler))
    assert torch.isfinite(pruning.reducer.scores.signal("grand")).all() and len(sampler.plan.indices) == 8


def test_a_memory_mapped_score_store_plans_exactly_like_the_in_memory_one(tmp_path, monkeypatch):
    held_in_memory = []  # bytes the store held in process memory when it was moved to files
    mapping = SampleScoreStore.memory_map
    monkeypatch.setattr(SampleScoreStore, "memory_map", lambda store, *a: held_in_memory.append(store.nbytes) or mapping(store, *a))
    runs = {}
    for name, path in (("memory", None), ("mapped", tmp_path / "store")):
        seed_everything(0)
        recorder, pruning = Recorder(), DataPruning(score_store_path=path)
        trainer(max_epochs=4, callbacks=[pruning, recorder]).fit(
            Classifier(), indexed_loader(40, 8, sampler=InfoBatchSampler(40, prune_ratio=0.5))
        )
        runs[name] = (recorder.ids, pruning.reducer.scores)
    assert runs["mapped"][0] == runs["memory"][0]  # every epoch's samples, in order
    assert any(len(ids) < 40 for ids in runs["memory"][0].values())  # pruning did prune
    mapped = runs["mapped"][1]
    assert mapped.path == tmp_path / "store" / "rank0" and (mapped.path / "loss.bin").stat().st_size == 40 * 4
    assert torch.equal(mapped.loss.nan_to_num(-1), runs["memory"][1].loss.nan_to_num(-1))
    assert held_in_memory == [0]  # mapped before anything sized it in memory
