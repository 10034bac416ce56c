"""Lightning callbacks - the public face of every capability's thin callback.

* :class:`LossReweighting` - online loss-based sample weights (:mod:`weightwise.weighting`).
* :class:`DataPruning` - connects a sampler of :mod:`weightwise.samplers` to the run (:mod:`weightwise.selection`).
* :class:`OnlineBatchSelection` - backpropagate only the most useful rows of each batch (:mod:`weightwise.selection`).
* :class:`LayerwiseSampling` - a few layers train at a time (:mod:`weightwise.layers`).
* :class:`ExpertUpcycling` - grow a Mixture-of-Experts mid-fit (:mod:`weightwise.experts`).
* :class:`DenseUpcycling` - turn a dense model into a Mixture-of-Experts mid-fit (:mod:`weightwise.experts`).
* :class:`SampleReport` - the samples weighted lowest and found hardest (:mod:`weightwise.reporting`).
* :class:`TokenWeighting`, :class:`SelectiveTokens` - weight or select tokens: DFT, Rho-1 (:mod:`weightwise.weighting`).
* :class:`SampleWeightCallback` - the base class of callbacks that contribute a weight factor.
* :class:`ComputeBudget` - stop the fit when a budget of FLOPs or tokens is spent (:mod:`weightwise.compute`).
* :class:`DomainMixing` - learn the data mixture over domains while the model trains (:mod:`weightwise.mixing`).
"""

from weightwise.compute.callback import ComputeBudget
from weightwise.experts.callback import ExpertUpcycling
from weightwise.experts.dense_callback import DenseUpcycling
from weightwise.layers.callback import LayerwiseSampling
from weightwise.mixing.callback import DomainMixing
from weightwise.reporting.report import SampleReport
from weightwise.selection.callback import DataPruning
from weightwise.selection.online import OnlineBatchSelection
from weightwise.weighting.callback import LossReweighting, SampleWeightCallback
from weightwise.weighting.guard import PerSampleLossGuard
from weightwise.weighting.reducer import PerSampleLossReducer, reducer_of
from weightwise.weighting.token_callback import SelectiveTokens, TokenWeightCallback, TokenWeighting

__all__ = [
    "ComputeBudget",
    "DataPruning",
    "DenseUpcycling",
    "DomainMixing",
    "ExpertUpcycling",
    "LayerwiseSampling",
    "LossReweighting",
    "OnlineBatchSelection",
    "PerSampleLossGuard",
    "PerSampleLossReducer",
    "SampleReport",
    "SampleWeightCallback",
    "SelectiveTokens",
    "TokenWeightCallback",
    "TokenWeighting",
    "reducer_of",
]
