"""Lightning callbacks: thin stateful adapters over :mod:`weightwise.losses` and the score store."""

from weightwise.callbacks.base import SampleWeightCallback
from weightwise.callbacks.guard import PerSampleLossGuard
from weightwise.callbacks.pruning import DataPruning
from weightwise.callbacks.reduction import PerSampleLossReducer, reducer_of
from weightwise.callbacks.reweighting import LossReweighting

__all__ = ["DataPruning", "LossReweighting", "PerSampleLossGuard", "PerSampleLossReducer", "SampleWeightCallback", "reducer_of"]
