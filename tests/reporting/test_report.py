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
    assert [r[1] for r in lowest] == torch.argsort(scores.weight)[:3].tolist()
    assert [r[1] for r in hardest] == torch.argsort(scores.ema, descending=True)[:3].tolist()
    assert report.columns[-1] == "label" and lowest[0][-1] == int(labels[lowest[0][1]])
    written = list(csv.reader(open(tmp_path / "weightwise_samples.csv")))  # no W&B logger: CSV
    assert written[0] == report.columns and len(written) == 7


def test_report_without_a_score_store_names_the_fix(tmp_path):
    with pytest.raises(MisconfigurationException, match="LossReweighting or DataPruning"):
        trainer(max_steps=1, callbacks=[SampleReport()], default_root_dir=tmp_path).fit(
            Classifier(per_sample=False), torch.utils.data.DataLoader(blobs(8), batch_size=4)
        )
