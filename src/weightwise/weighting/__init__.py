"""Sample weighting: per-sample losses, their weights, and the one place they are reduced.

Functional core (any training loop): :mod:`~weightwise.weighting.losses` (per-sample and
per-sequence losses, the weighted mean) and :mod:`~weightwise.weighting.reweighting` (the loss-based
strategies of Sow et al.). Lightning side: :mod:`~weightwise.weighting.reducer` (gathers the global
batch, multiplies every callback's factor, reduces once), :mod:`~weightwise.weighting.callback`
(``SampleWeightCallback``, ``LossReweighting``) and :mod:`~weightwise.weighting.guard`.
"""
