"""Experts: grow a Mixture-of-Experts from E to m·E experts mid-training (expert upcycling).

Functional core (any loop):

* :func:`upcycle_experts` - duplicate (top-K fixed) or granular split (top-(m·K), exact).
* :class:`ExpertUtility`, :func:`allocate_copies` - gradient-based utility and non-uniform copies.
* :func:`upcycle_dense` - a dense Llama/Mistral/Qwen2/Qwen3 model into its MoE class (copies,
  granular shards, Drop-Upcycling).
* :class:`ExpertsAdapter` - the interface a custom MoE block implements; transformers' fused
  experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) are recognised by :func:`find_moe_blocks`.

Lightning side: :mod:`~weightwise.experts.callback` (``ExpertUpcycling``),
:mod:`~weightwise.experts.dense_callback` (``DenseUpcycling``).
"""

from weightwise.experts.adapters import (
    ExpertsAdapter,
    FusedExpertsAdapter,
    find_moe_blocks,
)
from weightwise.experts.dense import DenseUpcycleReport, moe_config, upcycle_dense
from weightwise.experts.surgery import UpcycleReport, upcycle_experts
from weightwise.experts.utility import ExpertUtility, allocate_copies, expert_utility

__all__ = [
    "DenseUpcycleReport",
    "ExpertUtility",
    "ExpertsAdapter",
    "FusedExpertsAdapter",
    "UpcycleReport",
    "allocate_copies",
    "expert_utility",
    "find_moe_blocks",
    "moe_config",
    "upcycle_dense",
    "upcycle_experts",
]
