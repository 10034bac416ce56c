"""Distributed-aware samplers that choose which samples each epoch visits - the public face of
:mod:`weightwise.selection`.

All shard themselves across data-parallel ranks; use them with
``Trainer(use_distributed_sampler=False)`` and the :class:`weightwise.callbacks.DataPruning`
callback, which feeds them the score store and applies their loss corrections. The mixture
samplers of :mod:`weightwise.mixing` (:class:`MixtureBatchSampler`, :class:`MixingStream`) draw
each batch's domains by weights that :class:`weightwise.callbacks.DomainMixing` learns.
"""

from weightwise.mixing.sampler import MixtureBatchSampler
from weightwise.mixing.stream import MixingStream
from weightwise.selection.base import EpochPlan, EpochSampler
from weightwise.selection.ccs import CoverageSampler
from weightwise.selection.dsir import DSIRSampler
from weightwise.selection.importance import ImportanceSampler
from weightwise.selection.infobatch import InfoBatchSampler
from weightwise.selection.perplexity import PerplexityBandSampler, reference_perplexity, sequence_perplexity
from weightwise.selection.policies import POLICIES, make_sampler
from weightwise.selection.random_subsets import RandomSubsetSampler
from weightwise.selection.score_pruning import ScorePruningSampler

__all__ = [
    "CoverageSampler",
    "DSIRSampler",
    "EpochPlan",
    "EpochSampler",
    "ImportanceSampler",
    "InfoBatchSampler",
    "MixingStream",
    "MixtureBatchSampler",
    "POLICIES",
    "PerplexityBandSampler",
    "RandomSubsetSampler",
    "ScorePruningSampler",
    "make_sampler",
    "reference_perplexity",
    "sequence_perplexity",
]
