"""Mixture-of-Experts surgery: expert upcycling (E -> m·E experts) as pure functions.

* :func:`upcycle_experts` - duplicate (top-K fixed) or granular split (top-(m·K), exact).
* :class:`ExpertUtility`, :func:`allocate_copies` - gradient-based utility and non-uniform copies.
* :class:`ExpertsAdapter` - the interface a custom MoE block implements; transformers' fused
  experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) are recognised by :func:`find_moe_blocks`.
"""

from weightwise.moe.adapters import ExpertsAdapter, FusedExpertsAdapter, find_moe_blocks
from weightwise.moe.surgery import UpcycleReport, upcycle_experts
from weightwise.moe.utility import ExpertUtility, allocate_copies

__all__ = [
    "ExpertUtility",
    "ExpertsAdapter",
    "FusedExpertsAdapter",
    "UpcycleReport",
    "allocate_copies",
    "find_moe_blocks",
    "upcycle_experts",
]
