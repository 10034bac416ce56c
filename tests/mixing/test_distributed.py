"""Domain mixing on 2 DDP processes (gloo): the ranks draw different data and decide the same weights;
a resumed run continues exactly. One 2-process launch runs every job (tests/scripts/mixing_jobs.py)."""

import pytest
import torch

from tests.support.processes import ranks, run_suite

pytestmark = pytest.mark.slow

JOBS = [
    ("mixing_jobs:fit", {"out_dir": "{root}/mapped", "kind": "mapped"}),
    ("mixing_jobs:fit", {"out_dir": "{root}/mapped_first", "kind": "mapped", "save_at": 3}),
    ("mixing_jobs:fit", {"out_dir": "{root}/mapped_resumed", "kind": "mapped", "resume_from": "{root}/mapped_first/last.ckpt"}),
    ("mixing_jobs:fit", {"out_dir": "{root}/stream", "kind": "stream"}),
    ("mixing_jobs:fit", {"out_dir": "{root}/stream_first", "kind": "stream", "save_at": 3}),
    ("mixing_jobs:fit", {"out_dir": "{root}/stream_resumed", "kind": "stream", "resume_from": "{root}/stream_first/last.ckpt"}),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixing")
    jobs = [(job, {k: v.format(root=root) if isinstance(v, str) else v for k, v in kwargs.items()}) for job, kwargs in JOBS]
    run_suite(jobs, root)
    return root


@pytest.mark.parametrize("kind", ["mapped", "stream"])
def test_ranks_draw_different_data_and_decide_the_same_weights(runs, kind):
    zero, one = ranks(runs / kind)
    assert len(zero["weights"]) == 8 and all(torch.equal(a, b) for a, b in zip(zero["weights"], one["weights"]))
    assert len({tuple(w.tolist()) for w in zero["weights"]}) > 2  # the mixture moved
    assert zero["batches"] != one["batches"]
    first_pass = [set(sum(r["batches"][:3], [])) for r in (zero, one)]
    assert first_pass[0].isdisjoint(first_pass[1])  # disjoint shares
    assert torch.equal(zero["ledger"]["tokens"], one["ledger"]["tokens"])  # global counts
    assert torch.equal(zero["params"], one["params"])  # DDP kept the replicas equal


@pytest.mark.parametrize("kind", ["mapped", "stream"])
def test_a_resumed_ddp_run_continues_exactly(runs, kind):
    for whole, resumed in zip(ranks(runs / kind), ranks(runs / f"{kind}_resumed")):
        assert resumed["batches"] == whole["batches"][3:]
        assert torch.equal(resumed["weights"][-1], whole["weights"][-1]) and torch.equal(resumed["rewards"], whole["rewards"])
        assert torch.equal(resumed["params"], whole["params"])
