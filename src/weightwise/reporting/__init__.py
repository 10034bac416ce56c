"""Reporting: what weightwise did, for people - histograms in the logger and the sample table.

:mod:`~weightwise.reporting.histograms` (distributions for W&B and TensorBoard) and
:mod:`~weightwise.reporting.report` (``SampleReport``: the samples weighted lowest and found
hardest, as a W&B Table or a CSV).
"""
