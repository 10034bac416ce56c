"""One rank of a 2-process group, without processes: a stand-in for ``torch.distributed``.

Tests that exercise the multi-rank arithmetic of :mod:`weightwise.core.collectives` (and of what
calls it) in one process set ``collectives.dist`` to a :class:`TwoRanks`, which plays the other
rank's part (``monkeypatch.setattr(collectives, "dist", TwoRanks(rank, other))``).
"""

from __future__ import annotations

import torch


class TwoRanks:
    """``torch.distributed`` as one rank of a 2-process group sees it; the other rank holds ``other``.

    ``other`` is the other rank's tensor for each tensor this rank gathers, in order: an
    ``all_gather_variable`` call gathers the lengths first, then every column padded to the
    longest, so the other rank's columns are padded here exactly as that rank would pad them.
    ``all_reduce`` adds ``reduce_other(tensor)`` (default: the same values, a rank with the same data).
    """

    class ReduceOp:
        SUM = "sum"

    def __init__(self, rank: int, other: list[torch.Tensor] | None = None, reduce_other=None) -> None:
        self.rank = rank
        self.other = other or []
        self.reduce_other = reduce_other or (lambda tensor: tensor.clone())
        self.calls = 0

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def get_rank(self) -> int:
        return self.rank

    def all_gather(self, buffers: list[torch.Tensor], tensor: torch.Tensor) -> None:
        position = self.calls % (len(self.other) + 1)
        self.calls += 1
        if position == 0:  # the lengths
            theirs = torch.tensor([self.other[0].numel()], dtype=tensor.dtype)
        else:
            values = self.other[position - 1]
            theirs = tensor.new_zeros(tensor.numel())
            theirs[: values.numel()] = values.to(tensor.dtype)
        buffers[self.rank].copy_(tensor)
        buffers[1 - self.rank].copy_(theirs)

    def all_reduce(self, tensor: torch.Tensor, op=None) -> None:
        tensor += self.reduce_other(tensor)
