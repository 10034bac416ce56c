"""Score-based pruning: Data Diet (EL2N / GraNd) and NLU on Data Diets' periodic rescoring."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from weightwise.selection.base import EpochPlan, EpochSampler, check_fraction
from weightwise.selection.ranking import rank_range
from weightwise.selection.scoring import Averaging, ScoreAverager

Scoring = Literal["pass", "training"]


class ScorePruningSampler(EpochSampler):
    """Train on the highest-scored fraction of the data, chosen by scores of the whole training set.

    * Static (Paul et al., "Deep Learning on a Data Diet", NeurIPS 2021; ``mansheej/data_diet``):
      train ``warmup_epochs`` on all data, then score every sample (EL2N
      ``||softmax(z) - onehot(y)||``, GraNd or the loss; :mod:`weightwise.selection.scores`) and
      keep the ``keep_fraction`` with the highest score for the rest of training. ``skip_hardest``
      first drops that fraction of the very highest scores (with label noise the top scores are
      mostly mislabelled). Data Diet's own ``offset`` counts from the *lowest* score
      (``scores.argsort()[offset : offset + size]``, ``data_diet/data.py``): ``skip_hardest = s`` is
      their ``offset = N - size - s N``, and NLU on Data Diets' ``prune_offset = s``.
    * Dynamic (Attendu & Corbeil, "NLU on Data Diets", 2023; ``jpcorbeil-nuance/nlu_data_diets``):
      with ``rescore_every=n`` the whole training set is scored again every n epochs after the
      warm-up and the subset chosen anew.

    Scoring (``scoring="pass"``, both papers): a forward-only pass over the whole training set in
    eval mode without gradients, run by ``DataPruning`` before the epoch that needs it
    (:meth:`needs_scoring`; :mod:`weightwise.selection.scoring`) - it costs a forward pass, not a
    training epoch. Passes are combined by ``averaging`` (NLU on Data Diets: the latest, an EMA or
    the last k; Data Diet averages independent runs, which one run cannot). ``scoring="training"``
    is weightwise 0.1's departure: scores recorded by the training steps, rescoring epochs being
    full training epochs (no extra pass, but a full epoch instead of a forward pass).

    A guard against a known failure: with noisy labels the highest EL2N are mostly the mislabelled
    samples, and ``rescore_every`` with ``skip_hardest=0`` can then collapse a run (issue 23, a held-out
    text task with 30% flipped labels: 54.9% accuracy against 73.5% without pruning; with
    ``skip_hardest=0.3`` +3.4 points, but -2.9 on clean labels). After each EL2N pass the share of
    scores above 1 - samples the model misclassifies - is compared with the previous pass': a rise
    of more than 5 points warns, naming ``skip_hardest``.

    Within one run the selected subset continues training the warmed-up model (Data Diet retrains a
    fresh model on the subset). Kept samples are not reweighted (the pruned subset is a different,
    chosen objective, as in the papers). The selection is fixed between scorings and checkpointed.

    Args:
        num_samples: dataset size.
        keep_fraction: fraction of samples kept after scoring (rounded to a multiple of the world size).
        score: store signal to rank by (``"el2n"``, ``"grand"``, ``"grand_last_layer"``, ``"eval_loss"`` from a
            pass; ``"loss"``/``"ema"`` from training steps).
        warmup_epochs: full-data training epochs before the first scoring.
        rescore_every: ``None`` for static pruning, else the period of rescoring in epochs.
        skip_hardest: fraction of the highest-scored samples excluded before keeping.
        scoring: ``"pass"`` (the papers') or ``"training"`` (see above).
        averaging, ema_alpha, ema_std_coef, last_k: how passes combine
            (:class:`weightwise.selection.scoring.ScoreAverager`; ``"ema"`` is NLU on Data Diets' EMA plus
            ``ema_std_coef`` = 1.0 times the weighted standard deviation, its command line's default).
        seed, num_replicas, rank: see :class:`EpochSampler`.

    Raises:
        ValueError: a bad setting (the message names it).

    Example (EL2N scores from a forward-only pass after one epoch, the top half kept)::

        >>> sampler = ScorePruningSampler(1000, keep_fraction=0.5, score="el2n", warmup_epochs=1)
        >>> sampler.needs_scoring(0), sampler.needs_scoring(1)  # the first epoch is full; then a scoring pass
        (False, True)
    """

    ERROR_RISE: float | None = 0.05
    """A rise of the training error (the share of EL2N above 1) between passes that warns (``None``: never)."""

    def __init__(
        self,
        num_samples: int,
        keep_fraction: float = 0.5,
        *,
        score: str = "el2n",
        warmup_epochs: int = 1,
        rescore_every: int | None = None,
        skip_hardest: float = 0.0,
        scoring: Scoring = "pass",
        averaging: Averaging = "latest",
        ema_alpha: float = 0.8,
        ema_std_coef: float = 1.0,
        last_k: int = 3,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(num_samples, seed=seed, num_replicas=num_replicas, rank=rank)
        if scoring not in ("pass", "training"):
            raise ValueError(f"scoring must be 'pass' or 'training', got {scoring!r}")
        if warmup_epochs < (1 if scoring == "training" else 0):
            raise ValueError("warmup_epochs must be >= 1 with scoring='training': scores come from a full training epoch")
        if rescore_every is not None and rescore_every < (2 if scoring == "training" else 1):
            raise ValueError("rescore_every must be >= 1 (>= 2 with scoring='training', where 1 would make every epoch full)")
        self.keep_fraction = check_fraction("keep_fraction", keep_fraction)
        if not 0.0 <= skip_hardest < 1.0 - keep_fraction + 1e-9:
            raise ValueError(f"skip_hardest must be in [0, 1 - keep_fraction], got {skip_hardest}")
        self.score = score
        self.warmup_epochs = warmup_epochs
        self.rescore_every = rescore_every
        self.skip_hardest = skip_hardest
        self.scoring: Scoring = scoring
        self.averager = ScoreAverager(averaging, alpha=ema_alpha, k=last_k, std_coef=ema_std_coef)
        self._selection: torch.Tensor | None = None
        self._selected_after: int | None = None
        self._misclassified: float | None = None  # share of the last pass' EL2N above 1 (see _check_training_error)

    def is_full_epoch(self, epoch: int) -> bool:
        """Warm-up epochs visit every sample, and (``scoring="training"``) the rescoring epochs."""
        if epoch < self.warmup_epochs:
            return True
        since = epoch - self.warmup_epochs
        return self.scoring == "training" and self.rescore_every is not None and since > 0 and since % self.rescore_every == 0

    def needs_scoring(self, epoch: int) -> bool:
        if self.scoring != "pass" or epoch < self.warmup_epochs:
            return False
        since = epoch - self.warmup_epochs
        return since == 0 or (self.rescore_every is not None and since % self.rescore_every == 0)

    def record_scores(self, ids: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
        if self.scores is None:
            raise RuntimeError("no score store attached: DataPruning attaches the run's store before scoring")
        self.averager.record(self.scores, ids, scores)
        self._plan = None
        if self.score == "el2n" and "el2n" in scores and scores["el2n"].numel():
            self._check_training_error(float((scores["el2n"] > 1.0).float().mean()))

    def _check_training_error(self, misclassified: float) -> None:
        """Warn when the model got worse on its own training set between two scoring passes.

        EL2N above 1 implies the model's most likely class is not the sample's label
        (``(1 - p_y)^2 + sum_{j != y} p_j^2 > 1`` gives ``max_{j != y} p_j > p_y``), so the share of
        a pass' scores above 1 is a lower bound of the training error on every sample. Keeping the
        highest EL2N with ``skip_hardest=0`` under label noise keeps mostly the mislabelled
        samples; rescored, the run then fits them and unlearns the clean ones (issue 23, a held-out
        text task with 30% flipped labels: 18.6 points lost). That shows here as this share rising
        from one pass to the next by more than ``ERROR_RISE`` - training on the last selection made
        the model worse on the training set as a whole.
        """
        previous, self._misclassified = self._misclassified, misclassified
        if self.ERROR_RISE is not None and previous is not None and misclassified > previous + self.ERROR_RISE:
            rank_zero_warn(
                f"ScorePruningSampler: after training on the highest-EL2N samples, the model misclassifies {misclassified:.0%}"
                f" of the training set, up from {previous:.0%} at the previous scoring pass. With noisy labels the highest"
                " EL2N are mostly mislabelled samples, and rescoring can collapse the run: pass skip_hardest=<the share"
                " of labels you suspect are wrong> (or score once: rescore_every=None)"
            )

    def _scored_before(self, epoch: int) -> int:
        """The epoch whose scores the selection of ``epoch`` uses (scoring pass or full epoch)."""
        if self.scoring == "pass":
            return max(e for e in range(epoch + 1) if self.needs_scoring(e))
        return max(e for e in range(epoch) if self.is_full_epoch(e))

    def plan_epoch(self, epoch: int, generator: torch.Generator) -> EpochPlan:
        if self.is_full_epoch(epoch):
            return self.full_epoch(generator)
        scored = self._scored_before(epoch)
        if self._selection is None or self._selected_after != scored:
            scores = self.signal(self.score)
            if not torch.isfinite(scores).any():
                if self.scoring == "pass" and self.averager.passes > 0:
                    raise RuntimeError(
                        f"ScorePruningSampler found no {self.score!r} scores after the scoring pass: the score function"
                        f" must return {{{self.score!r}: [B] scores}} (DataPruning(score_fn=...) or training_step's 'scores')"
                    )
                return self.full_epoch(generator)  # nothing scored yet (no store, or before the pass)
            self._selection = self.select(scores)
            self._selected_after = scored
        order = torch.randperm(self._selection.numel(), generator=generator)
        return EpochPlan(self._selection[order])

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Ids of the kept samples: highest scores after skipping the top ``skip_hardest``."""
        keep = self.subset_size(self.keep_fraction)
        skip = min(round(self.skip_hardest * self.num_samples), self.num_samples - keep)
        return rank_range(scores, skip, skip + keep)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["selection"] = None if self._selection is None else self._selection.clone()
        state["selected_after"] = self._selected_after
        state["averager"] = self.averager.state_dict()
        state["misclassified"] = self._misclassified
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._selection = state["selection"]
        self._selected_after = state["selected_after"]
        if state.get("averager") is not None:
            self.averager.load_state_dict(state["averager"])
        self._misclassified = state.get("misclassified")
