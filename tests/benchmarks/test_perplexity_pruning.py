"""The perplexity-pruning benchmark runs end to end on a tiny pool, and its bands select what they say."""

import sys

import pytest

from benchmarks import perplexity_pruning

pytestmark = pytest.mark.slow  # trains a reference and three small models


def test_the_benchmark_scores_the_pool_once_and_reports_every_selection(monkeypatch, capsys):
    argv = ["perplexity_pruning", "--seeds", "0", "--steps", "2", "--reference-steps", "2", "--per-source", "60", "--held-out", "64",
            "--methods", "random,low,high"]
    monkeypatch.setattr(sys, "argv", argv)
    perplexity_pruning.main()
    table = capsys.readouterr().out.split("| selection |")[1]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:] if line.startswith("|")}
    assert set(rows) == {"random", "low", "high"}
    kept = {name: [float(x.strip(" %")) for x in rows[name].split("|")[4].split("/")] for name in ("low", "high")}
    assert all(sum(shares) == pytest.approx(100, abs=1.5) for shares in kept.values())
