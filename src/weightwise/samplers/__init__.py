"""Distributed-aware samplers that choose which samples each epoch visits.

All shard themselves across data-parallel ranks; use them with
``Trainer(use_distributed_sampler=False)`` and the :class:`weightwise.callbacks.DataPruning`
callback, which feeds them the score store and applies their loss corrections.
"""

from weightwise.samplers.base import EpochPlan, EpochSampler
from weightwise.samplers.importance import ImportanceSampler
from weightwise.samplers.infobatch import InfoBatchSampler
from weightwise.samplers.policies import POLICIES, make_sampler
from weightwise.samplers.random_subsets import RandomSubsetSampler
from weightwise.samplers.score_pruning import ScorePruningSampler

__all__ = [
    "EpochPlan",
    "EpochSampler",
    "ImportanceSampler",
    "InfoBatchSampler",
    "POLICIES",
    "RandomSubsetSampler",
    "ScorePruningSampler",
    "make_sampler",
]
