"""Data selection: which samples an epoch (or a step) trains on, and with which correction.

Functional core: per-epoch plans (:mod:`~weightwise.selection.base`: ``EpochPlan`` and the
self-sharding ``EpochSampler``) and the policies - InfoBatch (:mod:`~weightwise.selection.infobatch`),
RS2 (:mod:`~weightwise.selection.random_subsets`), importance sampling
(:mod:`~weightwise.selection.importance`), Data Diet pruning (:mod:`~weightwise.selection.score_pruning`,
ranking in :mod:`~weightwise.selection.ranking`), DSIR (:mod:`~weightwise.selection.dsir`: hashed n-gram
importance toward a target set), coverage-centric coreset selection (:mod:`~weightwise.selection.ccs`),
reference-model perplexity bands (:mod:`~weightwise.selection.perplexity`) - per-sample difficulty
scores (:mod:`~weightwise.selection.scores`) and forward-only scoring passes
(:mod:`~weightwise.selection.scoring`); per step, online batch selection
(:mod:`~weightwise.selection.online`: which rows of a batch are backpropagated). Lightning side:
:mod:`~weightwise.selection.callback` (``DataPruning``) and ``OnlineBatchSelection``. Public face:
:mod:`weightwise.samplers` and :mod:`weightwise.callbacks`.
"""
