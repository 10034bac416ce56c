"""Plausible one-line mistakes in the upcycling surgery that the suite must catch, checked directly.

Each test names the mistake it guards against (benchmarks/mutations.py plants them one at a time).
"""

import pytest
import torch

from tests.support.models import TinyMoELM, moe_loader, tiny_moe
from tests.support.training import trainer
from weightwise.callbacks import ExpertUpcycling
from weightwise.experts import allocate_copies, find_moe_blocks, upcycle_experts

UTILITY = torch.tensor([0.1, 0.9, 0.5, 0.2])  # greedy, 4 new copies: cap 3 -> [1, 4, 2, 1], cap 2 -> [1, 3, 3, 1], cap 1 -> [2, 2, 2, 2]


@pytest.mark.parametrize("cap, expected", [(1, [2, 2, 2, 2]), (2, [1, 3, 3, 1]), (3, [1, 4, 2, 1])])
def test_upcycle_experts_allocates_with_the_cap_it_is_given(cap, expected):
    """Guards against the greedy allocation's ``cap`` not being passed on (any cap but 3 ignored)."""
    model = tiny_moe("mixtral", top_k=1)
    names = list(find_moe_blocks(model))
    report = upcycle_experts(model, 2, selection="utility", utility={name: UTILITY for name in names}, cap=cap)
    for name in names:
        assert report.copies[name].tolist() == expected
        assert report.sources[name].tolist() == torch.arange(4).repeat_interleave(torch.tensor(expected)).tolist()


def test_expert_upcycling_allocates_with_its_cap():
    """The same through the callback: with cap=1 every expert gets one new copy whatever the measured
    utility, where the default cap of 3 gives the best expert more."""
    callback = ExpertUpcycling(at_step=3, selection="utility", utility_window=2, cap=1)
    trainer(max_steps=4, callbacks=[callback]).fit(TinyMoELM(), moe_loader())
    for name, utility in callback.utility.averages.items():
        assert callback.report.copies[name].tolist() == allocate_copies(utility, 8, cap=1).tolist() == [2, 2, 2, 2]
        assert allocate_copies(utility, 8, cap=3).tolist() != [2, 2, 2, 2]  # the cap decided it


@pytest.mark.parametrize("selection", ["uniform", "utility"])
def test_router_noise_goes_to_the_copies_rows_only(selection):
    """Guards against the router noise being added to the original experts' rows too: each source's
    first instance keeps its router row bit for bit, every further copy's row differs from its source's."""
    model = tiny_moe("mixtral", top_k=1, norm_topk_prob=True)
    blocks = find_moe_blocks(model)
    before = {name: block.router_weight.detach().clone() for name, block in blocks.items()}
    utility = {name: UTILITY for name in blocks} if selection == "utility" else None
    report = upcycle_experts(
        model, 2, selection=selection, utility=utility, router_noise=0.05, generator=torch.Generator().manual_seed(0)
    )
    for name, block in blocks.items():
        sources, rows = report.sources[name], block.router_weight.detach()
        first = torch.ones(len(sources), dtype=torch.bool)
        first[1:] = sources[1:] != sources[:-1]
        assert int(first.sum()) == 4
        assert torch.equal(rows[first], before[name])  # the originals, exactly
        assert (rows[~first] != before[name][sources[~first]]).all(dim=1).all()  # every copy's row moved
