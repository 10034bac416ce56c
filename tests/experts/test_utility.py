import pytest
import torch

from tests.support.models import tiny_moe
from weightwise.experts import ExpertUtility, allocate_copies, find_moe_blocks


def test_greedy_allocation_is_the_references_with_its_cap():
    # 4 new copies, cap 3: the best expert (1) takes 3, the next (2) one; the others keep only themselves
    assert allocate_copies(torch.tensor([0.1, 0.9, 0.5, 0.2]), 8).tolist() == [1, 4, 2, 1]
    # 12 new copies over 4 experts capped at 3: every expert reaches the cap
    assert allocate_copies(torch.tensor([0.1, 0.9, 0.5, 0.2]), 16).tolist() == [4, 4, 4, 4]
    # more new copies than experts x cap: the caps restart and the best expert starts again
    assert allocate_copies(torch.tensor([0.1, 0.9, 0.5, 0.2]), 18, cap=3).tolist() == [4, 6, 4, 4]
    assert allocate_copies(torch.tensor([3.0, 1.0, 2.0, 0.0]), 8, cap=1).tolist() == [2, 2, 2, 2]


def test_proportional_allocation_is_largest_remainder_with_one_copy_minimum():
    # 4 extra copies by utility 5:3:2:0 -> shares 2, 1.2, 0.8, 0 -> 2, 1, 0 + remainder to 0.8
    assert allocate_copies(torch.tensor([5.0, 3.0, 2.0, 0.0]), 8, allocation="proportional").tolist() == [3, 2, 2, 1]
    assert allocate_copies(torch.zeros(4), 8, allocation="proportional").tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="at least one copy"):
        allocate_copies(torch.ones(4), 3)
    with pytest.raises(ValueError, match="allocation"):
        allocate_copies(torch.ones(4), 8, allocation="random")


def backward_once(model):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize(
    "metric, projection, expected",
    [
        ("gradient_squared", "gate_up", lambda p, o: p["gate_up_proj"].grad.flatten(1).square().sum(1)),
        ("taylor", "both", lambda p, o: sum((q.detach() * q.grad).abs().flatten(1).sum(1) for q in p.values())),
        ("weight_norm", "down", lambda p, o: p["down_proj"].detach().flatten(1).norm(dim=1)),
        ("weight_grad_product", "gate_up", lambda p, o: p["gate_up_proj"].detach().flatten(1).norm(dim=1) * p["gate_up_proj"].grad.flatten(1).norm(dim=1)),
        (
            "approx_fisher",
            "gate_up",
            lambda p, o: p["gate_up_proj"].grad.flatten(1).square().sum(1)
            / (o.state[p["gate_up_proj"]]["exp_avg_sq"].flatten(1).norm(dim=1) + 1e-8),
        ),
    ],
)
def test_utility_metrics_per_expert_averaged_over_steps(metric, projection, expected):
    model = tiny_moe("olmoe", top_k=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    backward_once(model)
    optimizer.step()  # Adam state for approx_fisher
    blocks = find_moe_blocks(model)
    tracker = ExpertUtility(blocks, metric, projection)
    tracker.accumulate(optimizer)
    tracker.accumulate(optimizer)  # the same gradients twice: the average is one step's value
    name, block = next(iter(blocks.items()))
    want = expected(block.expert_parameters(), optimizer).double()
    torch.testing.assert_close(tracker.averages[name], want, rtol=1e-5, atol=1e-12)
    assert tracker.steps == 2 and torch.allclose(tracker.totals[name], 2 * want)


def test_utility_state_refuses_another_metric_and_reads_0_1_as_taylor():
    blocks = find_moe_blocks(tiny_moe("olmoe"))
    saved = ExpertUtility(blocks, "taylor", "both").state_dict()
    with pytest.raises(ValueError, match="utility_metric='taylor'"):
        ExpertUtility(blocks).load_state_dict(saved)
    legacy = {"totals": saved["totals"], "steps": 0}  # weightwise 0.1's layout
    ExpertUtility(blocks, "taylor", "both").load_state_dict(legacy)
