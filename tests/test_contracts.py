"""The resume contract over every callback and sampler (docs/architecture.md, contract 4).

For each case of ``tests/support/contracts.py``: a run interrupted by a checkpoint (at an epoch end,
or mid-epoch for the pruning samplers, whose epoch plan is checkpointed) and resumed from it ends
exactly as the uninterrupted run - the same parameters, and the same decisions from the resume on.
(The rank-agreement contract over the same cases is in ``tests/distributed``.)
"""

import pytest
import torch

from tests.support.contracts import CASES, fit_case
from tests.support.training import flat_params

pytestmark = pytest.mark.slow


def assert_same(resumed, straight, path=""):
    if isinstance(straight, torch.Tensor):
        assert isinstance(resumed, torch.Tensor) and torch.allclose(resumed.double(), straight.double(), atol=1e-6, equal_nan=True), path
    elif isinstance(straight, dict):
        for key, value in straight.items():
            assert_same(resumed[key], value, f"{path}.{key}")
    else:
        assert resumed == straight, path


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_resume_from_a_checkpoint_mid_run_equals_the_uninterrupted_run(case, tmp_path):
    straight, straight_callbacks, straight_seen, _ = fit_case(case, tmp_path / "straight")
    fit_case(case, tmp_path / "first", interrupted=True)
    resumed, resumed_callbacks, resumed_seen, _ = fit_case(case, tmp_path / "resumed", resume_from=tmp_path / "first" / "last.ckpt")

    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=0, atol=1e-6)
    expected = case.decisions(straight_callbacks, straight_seen)
    got = case.decisions(resumed_callbacks, resumed_seen)
    if "plans" in expected:  # the resumed run saw the epochs from the checkpoint on
        expected["plans"] = {epoch: plan for epoch, plan in expected["plans"].items() if epoch in got["plans"]}
        assert got["plans"], "the resumed run planned no epoch"
    if "layers" in expected:
        assert got["layers"] and got["layers"] == expected["layers"][len(expected["layers"]) - len(got["layers"]) :]
        expected["layers"] = got["layers"]
    assert_same(got, expected)
