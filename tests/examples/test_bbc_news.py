"""The demo and its BBC News / MiniLM-L6 parts, on a few articles (real corpus, real pretrained model)."""


import pytest
import torch

from examples.bbc_news import flip_labels, load_bbc_news


def test_corpus_is_the_real_bbc_news():
    texts, labels, classes = load_bbc_news()
    assert len(texts) == 2225 and classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert torch.bincount(labels).tolist() == [510, 386, 417, 511, 401]


def test_flip_labels_flips_exactly_the_fraction_to_other_classes():
    labels = torch.arange(100) % 5
    noisy, flipped = flip_labels(labels, 0.3, 5, torch.Generator().manual_seed(0))
    assert int(flipped.sum()) == 30
    assert (noisy[flipped] != labels[flipped]).all() and (noisy[~flipped] == labels[~flipped]).all()


@pytest.mark.slow
def test_demo_runs_end_to_end_and_prints_its_table(capsys):
    from examples import bbc_news_noisy_labels

    bbc_news_noisy_labels.main(["--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--no-wandb"])
    out = capsys.readouterr().out
    assert "clean test accuracy" in out and "flipped among lowest-weighted 30%" in out
    accuracy_row = next(line for line in out.splitlines() if line.startswith("clean test accuracy"))
    plain, weighted = (float(x) for x in accuracy_row.split()[3:5])
    assert 0.0 <= plain <= 1.0 and 0.0 <= weighted <= 1.0
