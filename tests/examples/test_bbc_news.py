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

    bbc_news_noisy_labels.main(["--limit-train", "32", "--limit-test", "16", "--max-length", "32", "--epochs", "1", "--no-wandb"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.strip().startswith("plain"))
    assert header.split() == ["plain", "rs2", "importance", "reweighting"]
    accuracy = next(line for line in out.splitlines() if line.startswith("clean test accuracy")).split()[3:]
    assert len(accuracy) == 4 and all(0.0 <= float(value) <= 1.0 for value in accuracy)
    passes = next(line for line in out.splitlines() if line.startswith("passes over the data")).split()[4:]
    assert passes == ["100%", "50%", "50%", "100%"]  # half the passes for the samplers
    assert "flipped among the highest loss EMA 30%" in out


def test_the_encoder_trains_with_dropout():
    from examples.bbc_news import MiniLMClassifier

    model = MiniLMClassifier()
    assert all(module.training for module in model.modules())  # from_pretrained would leave it in eval mode
