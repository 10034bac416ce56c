import pytest
import torch

from weightwise.selection.ranking import rank_range


@pytest.mark.parametrize("seed", range(5))
def test_rank_range_matches_a_stable_descending_sort_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (200,), generator=gen).float()  # many ties
    scores[torch.randint(0, 200, (5,), generator=gen)] = float("nan")  # unscored rank first
    reference = torch.argsort(torch.nan_to_num(scores, nan=float("inf")), descending=True, stable=True)
    for start, stop in [(0, 50), (17, 123), (0, 200), (199, 200)]:
        assert rank_range(scores, start, stop).tolist() == sorted(reference[start:stop].tolist())


def test_rank_range_rejects_bad_bounds():
    with pytest.raises(ValueError, match="rank range"):
        rank_range(torch.rand(5), 3, 7)
