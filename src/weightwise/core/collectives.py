"""Collectives that every rank calls in lock-step, so all ranks take the same decisions.

docs/architecture.md, contract 5: every decision is a function of values all ranks share.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of processes in the default group, 1 outside ``torch.distributed``."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process' rank in the default group, 0 outside ``torch.distributed``."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RankAware:
    """``num_replicas`` and ``rank`` as given at construction (``_num_replicas``, ``_rank``), else read
    from the default process group when asked - so a sampler or stream built before the process group
    starts shards itself correctly once it is iterated."""

    _num_replicas: int | None
    _rank: int | None

    @property
    def num_replicas(self) -> int:
        return self._num_replicas if self._num_replicas is not None else world_size()

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else rank()


def all_gather_variable(*tensors: Tensor) -> tuple[list[Tensor], slice]:
    """Concatenate 1-D tensors of equal length from every rank, in rank order.

    Ranks may hold different lengths: Lightning's ``all_gather`` needs equal shapes, but the last
    batch of an epoch (or a pruning sampler) can leave ranks with different batch sizes, so the
    lengths are exchanged once and every rank pads to the longest.

    Returns:
        the gathered tensors (detached, one per argument) and the slice of each that came from
        this rank.
    """
    local = [t.detach() for t in tensors]
    n_local = local[0].numel()
    if any(t.ndim != 1 or t.numel() != n_local for t in local):
        raise ValueError(f"all_gather_variable takes 1-D tensors of one length, got {[tuple(t.shape) for t in local]}")
    n_ranks = world_size()
    if n_ranks == 1:
        return local, slice(0, n_local)
    local_len = torch.tensor([n_local], device=local[0].device, dtype=torch.long)
    lengths = [torch.zeros_like(local_len) for _ in range(n_ranks)]
    dist.all_gather(lengths, local_len)
    sizes = [int(n.item()) for n in lengths]
    longest = max(sizes)
    gathered = []
    for t in local:
        padded = t.new_zeros(longest)
        padded[:n_local] = t
        buffers = [torch.empty_like(padded) for _ in range(n_ranks)]
        dist.all_gather(buffers, padded)
        gathered.append(torch.cat([buf[:size] for buf, size in zip(buffers, sizes)]))
    start = sum(sizes[: rank()])
    return gathered, slice(start, start + n_local)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over every rank (a copy; the input is left alone)."""
    total = tensor.detach().clone()
    if world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
