"""The capacity benchmark's smoke mode: equal FLOP budgets, counted experts, function-preserving surgeries."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from benchmarks import upcycling_capacity


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("capacity")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for split, files in (("train", ["textwrap.py", "shlex.py", "bisect.py"]), ("target", ["heapq.py"])):
        for domain in ("code", "docs"):
            folder = root / split / domain
            folder.mkdir(parents=True)
            for name in files:
                text = (stdlib / name).read_text()
                lines = text.splitlines()
                kept = [line for line in lines if line.lstrip().startswith("#") == (domain == "docs")] or lines
                (folder / f"{name}.txt").write_text("\n".join(kept))
    arms = "dense,moe-mE,dense->moe-mE:copy,moe-E->moe-mE:dup"  # top-1: both surgeries are exact
    return upcycling_capacity.main(["--smoke", "--corpus", str(root / "train"), "--target", str(root / "target"),
                                    "--arms", arms, "--top-k", "1", "--granularity", "1", "--curve-arms", "dense->moe-mE:copy", "--fractions", "0.5,1"])


def test_every_run_stops_at_its_budget_within_one_step(runs: list[dict]) -> None:
    assert {(r["method"], r["fraction"]) for r in runs} >= {("dense->moe-mE:copy", 0.5), ("dense->moe-mE:copy", 1.0)}
    for r in runs:
        flops, steps = r["spent"]["flops"], r["steps"]
        assert r["budget_flops"] <= flops < r["budget_flops"] + flops / (steps - 1), r["method"]
    # the FLOPs before a surgery count too: an upcycled run's steps lie between those of its cheapest
    # (dense) and its dearest (moe-mE, the most router FLOPs) phase
    steps = {r["method"]: r["steps"] for r in runs if r["fraction"] == 1.0}
    for upcycled in ("dense->moe-mE:copy", "moe-E->moe-mE:dup"):
        assert steps["moe-mE"] <= steps[upcycled] <= steps["dense"]


def test_the_experts_flops_are_counted(runs: list[dict]) -> None:
    # top-1 experts of the dense MLP's size: a token costs the dense model's FLOPs plus the router's,
    # never less (transformers' grouped_mm experts would count zero FLOPs: eager experts are used)
    per_step = {r["method"]: r["spent"]["flops"] / r["steps"] for r in runs if r["fraction"] == 1.0}
    assert per_step["dense"] < per_step["moe-mE"] < 1.05 * per_step["dense"]


def test_upcycling_preserves_the_function_at_the_surgery(runs: list[dict]) -> None:
    jumps = [r["jump"] for r in runs if r["method"] in ("dense->moe-mE:copy", "moe-E->moe-mE:dup")]
    assert len(jumps) == 3
    for jump in jumps:
        assert 0 < jump["step"]
        assert jump["after"] == pytest.approx(jump["before"], rel=1e-5, abs=0)
