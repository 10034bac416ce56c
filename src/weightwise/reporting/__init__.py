"""Reporting: what weightwise did, for people - histograms in the logger and the sample table.

:mod:`~weightwise.reporting.histograms` (distributions for W&B and TensorBoard) and
:mod:`~weightwise.reporting.report` (``suspicious_samples``, the functional core: the samples weighted
lowest and found hardest; ``SampleReport``, its callback: them as a W&B Table or a CSV).
"""

from weightwise.reporting.report import SampleReport, suspicious_samples

__all__ = ["SampleReport", "suspicious_samples"]
