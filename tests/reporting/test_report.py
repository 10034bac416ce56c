import csv

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tests.support.models import Classifier, blobs, indexed_loader
from tests.support.training import trainer
from weightwise.callbacks import LossReweighting, SampleReport


def test_report_lists_the_lowest_weighted_and_hardest_samples(tmp_path):
    labels = blobs(32).tensors[1]
    report = SampleReport(k=3, describe=lambda i: {"label": int(labels[i])})
    reweighting = LossReweighting("quadratic", warmup_steps=0)
    trainer(max_epochs=2, callbacks=[reweighting, report], default_root_dir=tmp_path).fit(Classifier(), indexed_loader(32, 8))
    scores = reweighting.reducer.scores
    lowest = [r for r in report.rows if r[0] == "lowest weight"]
    hardest = [r for r in report.rows if r[0] == "highest loss"]
    assert len(lowest) == 3 and len(hardest) == 3
    # lowest weight first; equal weights (the batch's two extremes weigh the same under quadratic) by higher EMA
    order = sorted(range(32), key=lambda i: (float(scores.weight[i]), -float(scores.ema[i])))
    assert [r[1] for r in lowest] == order[:3]
    assert [r[1] for r in hardest] == torch.argsort(scores.ema, descending=True)[:3].tolist()
    assert report.columns[-1] == "label" and lowest[0][-1] == int(labels[lowest[0][1]])
    written = list(csv.reader(open(tmp_path / "weightwise_samples.csv")))  # no W&B logger: CSV
    assert written[0] == report.columns and len(written) == 7


def test_report_without_a_score_store_names_the_fix(tmp_path):
    with pytest.raises(MisconfigurationException, match="LossReweighting or DataPruning"):
        trainer(max_steps=1, callbacks=[SampleReport()], default_root_dir=tmp_path).fit(
            Classifier(per_sample=False), torch.utils.data.DataLoader(blobs(8), batch_size=4)
        )


def test_lowest_weight_ranks_ties_by_the_loss_ema():
    """Where nothing reweights (RS2, Data Diet, CCS, online selection) every weight is 1: the "lowest
    weight" view must then list the hardest samples (by loss EMA), not the lowest ids."""
    from weightwise import SampleScoreStore
    from weightwise.reporting import suspicious_samples  # the public face

    store = SampleScoreStore(6, fields=("weight", "ema"))
    losses = torch.tensor([0.1, 0.5, 3.0, 0.2, 2.0, 0.3])
    store.update(torch.arange(6), losses, step=0, weights=torch.ones(6))
    views = suspicious_samples(store, 3)
    assert views["lowest weight"].tolist() == [2, 4, 1] == views["highest loss"].tolist()
    # a real lower weight still comes first; the tie among the rest is broken by the EMA
    store.update(torch.arange(6), losses, step=1, weights=torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0, 1.0]))
    assert suspicious_samples(store, 3)["lowest weight"].tolist() == [3, 2, 4]


def test_report_under_pruning_without_reweighting_lists_the_hardest(tmp_path):
    from weightwise.callbacks import DataPruning
    from weightwise.samplers import RandomSubsetSampler

    report, pruning = SampleReport(k=4), DataPruning()
    sampler = RandomSubsetSampler(32, fraction=0.5)
    trainer(max_epochs=2, callbacks=[pruning, report], default_root_dir=tmp_path).fit(
        Classifier(), indexed_loader(32, 8, sampler=sampler)
    )
    scores = pruning.reducer.scores
    lowest = [r for r in report.rows if r[0] == "lowest weight"]
    assert all(r[2] == 1.0 for r in lowest)  # every weight ties at 1
    seen = scores.seen.nonzero().squeeze(1)
    assert [r[1] for r in lowest] == seen[torch.argsort(scores.ema[seen], descending=True)[:4]].tolist()
