"""Lightning callbacks: thin stateful adapters over :mod:`weightwise.losses` and the score store."""

from weightwise.callbacks.base import SampleWeightCallback
from weightwise.callbacks.guard import PerSampleLossGuard
from weightwise.callbacks.layerwise import LayerwiseSampling
from weightwise.callbacks.pruning import DataPruning
from weightwise.callbacks.reduction import PerSampleLossReducer, reducer_of
from weightwise.callbacks.report import SampleReport
from weightwise.callbacks.reweighting import LossReweighting
from weightwise.callbacks.upcycling import ExpertUpcycling

__all__ = [
    "DataPruning",
    "ExpertUpcycling",
    "LayerwiseSampling",
    "LossReweighting",
    "PerSampleLossGuard",
    "PerSampleLossReducer",
    "SampleReport",
    "SampleWeightCallback",
    "reducer_of",
]
