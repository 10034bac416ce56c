"""The equal-compute benchmark: corpus layout, FLOP accounting, budgets, and the equal-compute arithmetic."""

import json
import math

import pytest
import torch

from benchmarks.equal_compute import analysis, corpus, methods
from benchmarks.equal_compute.__main__ import main
from benchmarks.equal_compute.harness import ModelSize, build_model, flops_per_row, load_rows
from weightwise.compute import ComputeMeter, spending


def write_corpus(root, per_line=False):
    """A corpus nobody here chose: two made-up domains (and a target), as files or as lines."""
    texts = {"recipes": [f"Stir {n} cups of flour into the batter and bake for {n + 20} minutes." for n in range(40)],
             "logs": [f"2024-01-{n % 28 + 1:02d} ERROR worker-{n} timeout after {n * 7} ms" for n in range(40)]}
    for split, domains in (("train", texts), ("target", {"recipes": texts["recipes"][::5]}), ("reference", {"recipes": texts["recipes"][1::5]})):
        for domain, lines in domains.items():
            folder = root / split / domain
            folder.mkdir(parents=True)
            if per_line:
                (folder / "all.txt").write_text("\n".join(lines) + "\n")
            else:
                for i, line in enumerate(lines):
                    (folder / f"{i:03d}.txt").write_text(line)


def test_documents_are_files_or_lines_and_bad_layouts_name_the_fix(tmp_path):
    write_corpus(tmp_path / "files")
    write_corpus(tmp_path / "lines", per_line=True)
    by_file = corpus.read_documents(tmp_path / "files" / "train")
    by_line = corpus.read_documents(tmp_path / "lines" / "train", unit="line")
    assert [(d.domain, d.text) for d in by_file] == [(d.domain, d.text) for d in by_line]
    assert len(corpus.read_documents(tmp_path / "lines" / "train")) == 2  # unit="file": one document per file
    with pytest.raises(ValueError, match="<domain>/\\*.txt"):
        corpus.read_documents(tmp_path / "files")  # the split folders hold folders, not .txt files
    with pytest.raises(ValueError, match="not a folder"):
        corpus.read_documents(tmp_path / "missing")
    with pytest.raises(ValueError, match="unit"):
        corpus.read_documents(tmp_path / "files" / "train", unit="page")


def test_rows_pack_one_domain_each_and_keep_documents_apart(tmp_path):
    write_corpus(tmp_path)
    rows = load_rows(tmp_path / "train", seq_len=64)
    assert rows.domains == ["logs", "recipes"]
    for row, domain in zip(rows.rows, rows.domain_of_row, strict=True):
        text = bytes(row["input_ids"].tolist()).decode()
        assert ("Stir" if rows.domains[domain] == "logs" else "ERROR") not in text
        starts = row["position_ids"] == 0  # a document (or a row's continuation) starts: no target there
        assert (row["labels"][starts] == -100).all() and (row["labels"][~starts] == row["input_ids"][~starts]).all()


def test_the_built_in_corpus_has_its_shares_and_disjoint_splits(tmp_path):
    counts = corpus.build(tmp_path, pool_bytes=20_000, target_bytes=3_000, reference_bytes=3_000)
    assert set(counts["train"]) == {"news", "code", "duplicates", "boilerplate", "junk", "fragments"}
    sizes = {d: sum(len(p.read_bytes()) for p in (tmp_path / "train" / d).glob("*.txt")) for d in counts["train"]}
    total = sum(sizes.values())
    assert (sizes["news"] + sizes["code"]) / total == pytest.approx(0.45, abs=0.05)
    assert sizes["duplicates"] / total == pytest.approx(0.25, abs=0.04)
    texts = {split: {p.read_text() for p in (tmp_path / split).rglob("*.txt")} for split in corpus.SPLITS}
    clean_train = {p.read_text() for d in ("news", "code") for p in (tmp_path / "train" / d).glob("*.txt")}
    assert not texts["target"] & texts["reference"] and not texts["target"] & clean_train and not texts["reference"] & clean_train
    with pytest.raises(ValueError, match="sum to 1"):
        corpus.build(tmp_path / "bad", shares={**corpus.DEFAULT_SHARES, "junk": 0.5})


def test_flops_per_row_match_the_2n_and_4n_rule_plus_attention():
    size = ModelSize(hidden=32, layers=2, heads=4)
    model = build_model(size)
    forward, backward = flops_per_row(model, seq_len=16)
    # every matmul weight once per token (the embedding lookup is no matmul; the head is), plus QK^T and AV
    matmul_params = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in name)
    attention = 2 * 2 * 16 * 32 * 2  # per token: 2 matmuls x 2 FLOPs x seq x hidden x layers
    assert forward == 2 * matmul_params * 16 + attention * 16
    assert backward == 2 * forward


def test_computebudget_counts_what_flops_per_row_says_for_training_and_selection_forwards():
    model = build_model(ModelSize(hidden=32, layers=1))
    forward, backward = flops_per_row(model, 8)
    ids = torch.zeros(4, 8, dtype=torch.long)
    with ComputeMeter(model) as meter:
        with torch.no_grad(), spending("selection_forward"):
            model(input_ids=ids)  # online selection's forward: 4 rows, no backward
        loss = model(input_ids=ids[:2], labels=ids[:2]).loss  # a training forward of 2 rows
        with meter.backward():
            loss.backward()
        meter.paused = True
        with torch.no_grad():
            model(input_ids=ids)  # a held-out evaluation (HeldOut pauses the meter): not counted
        meter.paused = False
    spent = meter.take()
    assert spent.by_source["selection_forward"] == 4 * forward
    assert spent.by_source["model"] == 2 * (forward + backward)
    assert spent.flops == 6 * forward + 2 * backward


def test_equal_compute_figures_interpolate_in_log_flops():
    points = [(1e9, 3.0), (2e9, 2.5), (4e9, 2.2)]
    assert analysis.loss_at(points, 2e9) == pytest.approx(2.5)
    assert analysis.loss_at(points, math.sqrt(2) * 1e9) == pytest.approx(2.75)
    flops, extrapolated = analysis.flops_to_reach(points, 2.35)
    assert flops == pytest.approx(math.sqrt(8) * 1e9) and not extrapolated
    flops, extrapolated = analysis.flops_to_reach(points, 3.25)  # reached before the smallest budget
    assert flops == pytest.approx(1e9 / math.sqrt(2)) and extrapolated
    flops, extrapolated = analysis.flops_to_reach(points, 2.05)  # beyond the largest budget
    assert flops == pytest.approx(4e9 * math.sqrt(2)) and extrapolated
    assert analysis.flops_to_reach([(1e9, 3.0), (2e9, 3.1)], 2.0) == (math.inf, True)
    mean, half = analysis.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1 / math.sqrt(3), rel=1e-6)


def test_method_specs_parse_combine_and_refuse_nonsense():
    assert methods.parse("dsir+linupper:r=1,warmup=0.2") == [("dsir", {}), ("linupper", {"r": 1.0, "warmup": 0.2})]
    assert methods.parse("perplexity:band=medium") == [("perplexity", {"band": "medium"})]
    with pytest.raises(ValueError, match="unknown method 'lisa'"):
        methods.parse("plain+lisa")
    with pytest.raises(ValueError, match="key=value"):
        methods.parse("linupper:r")


# trains 9 tiny models: 3 s on an idle 2-core machine
def test_the_harness_runs_a_corpus_given_by_path_at_equal_compute(tmp_path, capsys):
    write_corpus(tmp_path / "c", per_line=True)
    out = tmp_path / "out"
    main(["--corpus", str(tmp_path / "c" / "train"), "--target", str(tmp_path / "c" / "target"), "--reference",
          str(tmp_path / "c" / "reference"), "--unit", "line", "--seq-len", "32", "--batch-size", "4", "--hidden", "32",
          "--reference-hidden", "8", "--reference-layers", "1", "--budget-steps", "10", "--fractions", "0.5", "1.0",
          "--checkpoints", "2", "--seeds", "1", "--reference-steps", "2",
          "--methods", "plain", "infobatch", "select:start=0,end=1,interrupt=0", "rho:keep=0.5", "--out", str(out)])
    printed = capsys.readouterr().out
    runs = json.loads((out / "results.json").read_text())["runs"]
    by = {(r["method"], r["fraction"]): r for r in runs}
    forward, backward = flops_per_row(build_model(ModelSize(hidden=32, layers=2)), 32)
    step = 4 * (forward + backward)
    assert by["plain", 1.0]["spent"]["flops"] == 10 * step and by["plain", 0.5]["steps"] == 5
    for run in runs:  # every run stops at its budget, within one of its steps
        assert run["budget"] <= run["spent"]["flops"] < run["budget"] + 2 * step
    # InfoBatch's first epoch is unscored and full, in plain's order: the same run, bit for bit
    assert by["infobatch", 1.0]["points"][-1]["heldout_loss"] == by["plain", 1.0]["points"][-1]["heldout_loss"]
    # online selection forwards 4 rows without gradients and trains 2 of them, every step
    selected = by["select:start=0,end=1,interrupt=0", 1.0]
    assert selected["spent"]["by_source"]["selection_forward"] == selected["steps"] * 4 * forward
    assert selected["spent"]["by_source"]["model"] == selected["steps"] * 2 * (forward + backward)
    # RHO-LOSS: the reference model scores the whole pool once; batches of 8 rows, 4 backpropagated
    rho = by["rho:keep=0.5", 1.0]["spent"]
    reference_forward, _ = flops_per_row(build_model(ModelSize(hidden=8, layers=1)), 32)
    pool_rows = len(load_rows(tmp_path / "c" / "train", 32, unit="line").rows)
    assert rho["by_source"]["reference_model"] == pool_rows * reference_forward
    assert rho["by_source"]["selection_forward"] == by["rho:keep=0.5", 1.0]["steps"] * 8 * forward
    assert "| plain | 1 |" in printed and "compute to reach plain's final loss" in printed
    assert (out / "loss_vs_flops.png").stat().st_size > 10_000


def test_mix_specs_take_the_policy_bare():
    assert methods.parse("mix:odm,warmup=0.2") == [("mix", {"policy": "odm", "warmup": 0.2})]
    assert methods.parse("dft+mix:uniform") == [("dft", {}), ("mix", {"policy": "uniform"})]
    with pytest.raises(ValueError, match="key=value"):
        methods.parse("dft:dft")  # only mix takes a bare first parameter


# trains 7 tiny models: ~3 s on an idle 2-core machine
def test_token_and_mixing_methods_run_and_count_the_reference_model(tmp_path):
    write_corpus(tmp_path / "c", per_line=True)
    out = tmp_path / "out"
    specs = ["plain", "dft", "rho1", "mix:uniform", "mix:odm,warmup=0", "mix:doremi"]
    main(["--corpus", str(tmp_path / "c" / "train"), "--target", str(tmp_path / "c" / "target"), "--reference",
          str(tmp_path / "c" / "reference"), "--unit", "line", "--seq-len", "32", "--batch-size", "4", "--hidden", "32",
          "--reference-hidden", "8", "--reference-layers", "1", "--budget-steps", "6", "--fractions", "1.0",
          "--checkpoints", "1", "--seeds", "1", "--reference-steps", "2", "--methods", *specs, "--out", str(out)])
    by = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    forward, backward = flops_per_row(build_model(ModelSize(hidden=32, layers=2)), 32)
    reference_forward, _ = flops_per_row(build_model(ModelSize(hidden=8, layers=1)), 32)
    for spec in specs:  # every batch trains 4 whole rows; the reference forwards the same 4 rows, every step
        spent = by[spec]["spent"]
        assert spent["by_source"]["model"] == by[spec]["steps"] * 4 * (forward + backward), spec
        reference = by[spec]["steps"] * 4 * reference_forward if spec in ("rho1", "mix:doremi") else 0
        assert spent["by_source"].get("reference_model", 0) == reference, spec
    # token weights change the gradient, so the runs differ from plain's (same initialisation, same order)
    assert by["dft"]["points"][-1]["heldout_loss"] != by["plain"]["points"][-1]["heldout_loss"]
    assert by["rho1"]["points"][-1]["heldout_loss"] != by["plain"]["points"][-1]["heldout_loss"]
    # mixing: a weight per domain after every step; uniform stays uniform, ODM moves off the natural mixture
    names = by["mix:uniform"]["domain_names"]
    assert names == ["logs", "recipes"] and len(by["mix:uniform"]["domain_weights"]) == by["mix:uniform"]["steps"]
    assert all(w["weights"] == [0.5, 0.5] for w in by["mix:uniform"]["domain_weights"])
    odm = [w["weights"] for w in by["mix:odm,warmup=0"]["domain_weights"]]
    assert odm[-1] != odm[0] and all(abs(sum(w) - 1) < 1e-9 for w in odm)
    assert (out / "mixing_weights.png").stat().st_size > 10_000
