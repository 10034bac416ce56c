"""Build a sampler from a policy name - for configs (LightningCLI YAML) and scripts."""

from __future__ import annotations

from typing import Any

from weightwise.selection.base import EpochSampler
from weightwise.selection.ccs import CoverageSampler
from weightwise.selection.importance import ImportanceSampler
from weightwise.selection.infobatch import InfoBatchSampler
from weightwise.selection.perplexity import PerplexityBandSampler
from weightwise.selection.random_subsets import RandomSubsetSampler
from weightwise.selection.score_pruning import ScorePruningSampler

POLICIES: dict[str, tuple[type[EpochSampler], dict[str, Any]]] = {
    "infobatch": (InfoBatchSampler, {}),
    "rs2": (RandomSubsetSampler, {}),
    "importance": (ImportanceSampler, {}),
    "el2n": (ScorePruningSampler, {"score": "el2n"}),
    "grand": (ScorePruningSampler, {"score": "grand"}),
    "grand_last_layer": (ScorePruningSampler, {"score": "grand_last_layer"}),
    "ccs": (CoverageSampler, {}),
    "perplexity": (PerplexityBandSampler, {}),
}


def make_sampler(policy: str, num_samples: int, **kwargs: Any) -> EpochSampler:
    """``make_sampler("infobatch", len(ds), prune_ratio=0.5)``; ``kwargs`` go to the sampler class.

    Policies: ``infobatch``, ``rs2``, ``importance``, ``el2n``, ``grand`` and ``grand_last_layer``
    (Data Diet pruning by that score - GraNd's per-sample gradient norm needs a ``score_fn`` with
    :func:`weightwise.losses.grand` in ``DataPruning``; ``rescore_every=n`` for the dynamic variant),
    ``ccs`` (coverage-centric coreset selection, EL2N by default: ``keep_fraction``, ``skip_hardest``)
    and ``perplexity`` (a band of reference-model perplexity, ``band``, ``keep_fraction``; needs
    ``DataPruning(score_fn=reference_perplexity(reference_model))``).

    Raises:
        ValueError: an unknown policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown pruning policy {policy!r}; choose one of {sorted(POLICIES)}")
    cls, defaults = POLICIES[policy]
    return cls(num_samples, **{**defaults, **kwargs})
