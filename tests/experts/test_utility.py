import pytest
import torch

from tests.support.models import tiny_moe
from weightwise.experts import ExpertUtility, allocate_copies, find_moe_blocks


def test_allocation_is_largest_remainder_with_one_copy_minimum():
    # 4 extra copies by utility 5:3:2:0 -> shares 2, 1.2, 0.8, 0 -> 2, 1, 0 + remainder to 0.8
    assert allocate_copies(torch.tensor([5.0, 3.0, 2.0, 0.0]), 8).tolist() == [3, 2, 2, 1]
    assert allocate_copies(torch.zeros(4), 8).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="at least one copy"):
        allocate_copies(torch.ones(4), 3)


def test_utility_is_abs_theta_times_grad_per_expert():
    model = tiny_moe("olmoe", top_k=2).train()
    blocks = find_moe_blocks(model)
    tracker = ExpertUtility(blocks)
    ids = torch.randint(0, 97, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    tracker.accumulate()
    name, block = next(iter(blocks.items()))
    params = block.expert_parameters()
    expected = sum((p.detach() * p.grad).abs().flatten(1).sum(1).double() for p in params.values())
    assert torch.allclose(tracker.totals[name], expected)
    assert tracker.steps == 1 and (tracker.totals[name] >= 0).all()
