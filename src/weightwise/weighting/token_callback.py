"""Lightning callbacks that weight tokens: ``TokenWeighting`` (DFT) and ``SelectiveTokens`` (Rho-1).

Thin callbacks over :mod:`weightwise.weighting.tokens`. Each is a
:class:`~weightwise.weighting.callback.SampleWeightCallback` whose per-sample factor is 1 and which
gives the shared reducer a factor per *token*; the reducer multiplies it with every sample-level
factor (``LossReweighting``'s weights, a sampler's correction) into one weight per token and divides
by the global count of selected tokens (docs/architecture.md, contract 3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from weightwise.core import collectives
from weightwise.core.checkpoints import state_version, with_version
from weightwise.core.ids import SAMPLE_ID_KEY
from weightwise.weighting.callback import SampleWeightCallback
from weightwise.weighting.losses import DEFAULT_CHUNK_TOKENS
from weightwise.weighting.losses import TokenWeighting as TokenScope
from weightwise.weighting.reducer import NonFinitePolicy
from weightwise.weighting.tokens import (
    RHO1_KEEP,
    ReferenceLosses,
    dft_weights,
    excess_losses,
    output_vocabulary,
    top_tokens,
)

TokenStrategy = Literal["dft", "uniform"]
TokenWeightFn = Callable[[Tensor, Tensor], Tensor]
"""``(token_losses [B, T], mask [B, T]) -> [B, T]`` detached, non-negative token factors."""
ReferenceTokenLoss = Callable[[Any], "tuple[Tensor, Tensor]"]
"""``batch -> (token_losses [B, T], mask [B, T])`` of a reference model, shaped like the training step's."""

LEDGER_KEYS = ("steps", "tokens_valid", "tokens_selected", "reference_tokens", "reference_flops")


class TokenWeightCallback(SampleWeightCallback):
    """Base of the callbacks that weight tokens; subclasses implement :meth:`token_weights`.

    The ``training_step`` returns token losses and their mask, ``{"loss": token_losses, "mask": mask}``
    (:func:`weightwise.losses.token_cross_entropy`), optionally with ``position_ids`` or
    ``document_ids`` for packed rows. The step's loss is then
    ``sum_t w_sample(t) w_t l_t / N_selected`` with ``N_selected`` the selected tokens of the global
    micro-batch (``token_weighting="global"``) or of each rank's (``"rank"``, averaged by DDP).

    Ledger (``ledger``, checkpointed; per step ``weightwise/tokens_valid`` and
    ``weightwise/tokens_selected``, totals ``weightwise/token_<key>`` at each epoch end), over the
    global batch: ``tokens_valid`` (tokens with a target), ``tokens_selected`` (those whose loss is
    backpropagated: a non-zero factor), ``reference_tokens`` and ``reference_flops`` (positions a
    reference model forwarded and ``2 x its parameters x those positions``: the forward-pass
    estimate, counted here because ``weightwise.compute`` was not yet available). The model's own
    forward and backward still run over every position: selection changes which losses have a
    gradient, not the compute of the step.

    Raises:
        ValueError: an unknown ``nonfinite`` policy or ``token_weighting``.

    Example (a token factor of your own: it multiplies into the one combined weight)::

        >>> import torch
        >>> class SkipEasyTokens(TokenWeightCallback):  # leave out tokens the model already predicts
        ...     def token_weights(self, token_losses, mask, batch, trainer):
        ...         return (mask & (token_losses > 0.1)).float()
        >>> SkipEasyTokens().token_weights(torch.tensor([[0.05, 2.0]]), torch.tensor([[True, True]]), None, None)
        tensor([[0., 1.]])
    """

    STATE_VERSION = 1

    def __init__(
        self,
        *,
        nonfinite: NonFinitePolicy = "raise",
        sample_id_key: str = SAMPLE_ID_KEY,
        token_weighting: TokenScope = "global",
        store_fields: Sequence[str] = (),
    ) -> None:
        super().__init__(nonfinite=nonfinite, sample_id_key=sample_id_key, token_weighting=token_weighting, store_fields=store_fields)
        self.ledger: dict[str, int] = dict.fromkeys(LEDGER_KEYS, 0)

    @override
    def sample_weights(self, losses: Tensor, sample_ids: Tensor | None, trainer: pl.Trainer) -> None:
        return None  # its factor is per token (token_weights)

    def token_weights(self, token_losses: Tensor, mask: Tensor, batch: Any, trainer: pl.Trainer) -> Tensor | None:
        """This callback's factor for each token of this rank's micro-batch (``None``: all ones).

        Args:
            token_losses: ``[B, T]`` float32 token losses, detached.
            mask: ``[B, T]`` bool, the valid tokens.
            batch: the step's batch (e.g. for a reference model's forward).
            trainer: the running trainer.
        """
        raise NotImplementedError

    def account_tokens(self, valid: int, selected: int) -> None:
        """Count one micro-batch's global valid and selected tokens (called by the reducer)."""
        self.ledger["steps"] += 1
        self.ledger["tokens_valid"] += valid
        self.ledger["tokens_selected"] += selected

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {f"weightwise/token_{key}": float(value) for key, value in self.ledger.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _settings(self) -> dict[str, Any]:
        return {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return with_version({"ledger": dict(self.ledger), **self._settings()}, self.STATE_VERSION)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_version(state_dict, type(self).__name__, self.STATE_VERSION)
        changed = {k: (state_dict[k], v) for k, v in self._settings().items() if state_dict.get(k) != v}
        if changed:
            raise ValueError(
                f"the checkpoint was trained with other {type(self).__name__} settings (saved, now): {changed};"
                " resume with the saved settings"
            )
        self.ledger = {key: int(state_dict["ledger"][key]) for key in LEDGER_KEYS}


class TokenWeighting(TokenWeightCallback):
    """Weight every token of the training step's loss by a function of its own loss.

    * ``"dft"`` (default) - Dynamic Fine-Tuning: Wu et al., "On the Generalization of SFT: A
      Reinforcement Learning Perspective with Reward Rectification" (2025; authors' code
      ``yongliang-wu/DFT``, ``verl/verl/trainer/fsdp_dft_trainer.py``): each token's loss times its
      detached probability, ``l_t * p_t`` with ``p_t = exp(-l_t)`` (the reference computes
      ``softmax(logits).gather(label)``, the same number, from a ``[B, T, V]`` softmax this avoids),
      summed over the valid tokens and divided by their count.
    * ``"uniform"`` - factor 1: plain token-mean training, exactly.
    * a callable ``(token_losses, mask) -> [B, T]`` factors, for a strategy of your own.

    Default departure, named: ``token_weighting="global"`` divides by the valid tokens of the whole
    global micro-batch; DFT's trainer divides each rank's micro-batch by its own count (verl's
    ``balance_dp_token=False``) - ``token_weighting="rank"`` reproduces that. One process: the same.
    With ``LossReweighting`` or other weightwise callbacks give them the same ``token_weighting``.

    Args:
        strategy: ``"dft"``, ``"uniform"`` or a callable.
        nonfinite, sample_id_key, token_weighting, store_fields: see :class:`SampleWeightCallback`.

    Raises:
        ValueError: an unknown strategy (or one from :class:`SampleWeightCallback`).

    Example::

        >>> import lightning.pytorch as pl
        >>> from weightwise.callbacks import TokenWeighting
        >>> trainer = pl.Trainer(callbacks=[TokenWeighting("dft")], logger=False)
    """

    def __init__(
        self,
        strategy: TokenStrategy | TokenWeightFn = "dft",
        *,
        nonfinite: NonFinitePolicy = "raise",
        sample_id_key: str = SAMPLE_ID_KEY,
        token_weighting: TokenScope = "global",
        store_fields: Sequence[str] = (),
    ) -> None:
        super().__init__(nonfinite=nonfinite, sample_id_key=sample_id_key, token_weighting=token_weighting, store_fields=store_fields)
        if not callable(strategy) and strategy not in ("dft", "uniform"):
            raise ValueError(f"strategy must be 'dft', 'uniform' or a callable (token_losses, mask) -> weights, got {strategy!r}")
        self.strategy = strategy

    def _settings(self) -> dict[str, Any]:
        return {"strategy": self.strategy if isinstance(self.strategy, str) else "callable"}

    @override
    def token_weights(self, token_losses: Tensor, mask: Tensor, batch: Any, trainer: pl.Trainer) -> Tensor | None:
        if self.strategy == "uniform":
            return None
        if self.strategy == "dft":
            return dft_weights(token_losses, mask)
        weights = self.strategy(token_losses, mask)  # type: ignore[operator]
        if not isinstance(weights, Tensor) or weights.shape != token_losses.shape or bool((weights < 0).any()):
            raise ValueError(
                f"a token strategy must return non-negative weights shaped like the token losses {tuple(token_losses.shape)}"
            )
        return weights


class SelectiveTokens(TokenWeightCallback):
    """Train on the tokens whose loss most exceeds a reference model's: Rho-1's selective language modelling.

    Lin et al., "Rho-1: Not All Tokens Are What You Need" (NeurIPS 2024; ``microsoft/rho`` - which
    holds evaluation code only: the training code was not released, issue #4 there, so the paper is
    the reference). Every step the reference model scores the batch's tokens without gradients;
    the excess loss ``L_theta - L_ref`` ranks the valid tokens of the *global* micro-batch (every
    rank's, gathered) and the top ``keep`` fraction is kept (:func:`weightwise.weighting.tokens.top_tokens`);
    the loss is ``1 / (N keep) sum_t I_keep(t) l_t`` (the paper's ``L_SLM``), times any
    sample-level factor. Every rank selects the same tokens.

    Defaults are the paper's: ``keep=0.6`` (its 1B runs; 0.7 for 7B), ranking within the batch.
    The reference model's forward is counted in the ledger (``reference_flops``).

    Reference model: a transformers causal LM (``reference_model=``) sharing the trained model's
    tokenizer, run on the batch's ``input_ids`` (and ``attention_mask``, ``position_ids``) with
    ``labels`` (default: the inputs, ``shift=True``); its token losses come from its last hidden
    states and output embedding in chunks, so neither model's ``[B, T, V]`` logits are copied. It is
    moved to the module's device and put in eval mode for the fit, and given back as it came.
    For another model or batch layout pass ``reference_loss=lambda batch: (token_losses, mask)``.

    Args:
        reference_model: the reference causal LM.
        keep: fraction of the global batch's valid tokens trained on (the paper's k%).
        reference_loss: instead of ``reference_model``, a function giving the reference token losses.
        reference_params: parameters counted for ``reference_flops`` with ``reference_loss``
            (default: those of ``reference_model``).
        labels_key, shift, ignore_index, chunk_tokens: how the reference's token losses are
            computed, as the training step computes its own (:func:`weightwise.losses.token_cross_entropy`).
        nonfinite, sample_id_key, store_fields: see :class:`SampleWeightCallback`.
        token_weighting: must be ``"global"`` (the selected count is the global batch's).

    Raises:
        ValueError: ``keep`` outside (0, 1], no reference or two, ``token_weighting="rank"``;
            at fit start a reference model whose vocabulary or special token ids differ from the
            trained model's; during the fit a batch with no valid token, a ``keep`` that selects
            none, reference losses shaped otherwise, label ids outside the reference vocabulary.

    Example::

        >>> import lightning.pytorch as pl
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from weightwise.callbacks import SelectiveTokens
        >>> reference = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                                          num_hidden_layers=1, num_attention_heads=2))
        >>> trainer = pl.Trainer(callbacks=[SelectiveTokens(reference, keep=0.6)], logger=False)
    """

    def __init__(
        self,
        reference_model: nn.Module | None = None,
        *,
        keep: float = RHO1_KEEP,
        reference_loss: ReferenceTokenLoss | None = None,
        reference_params: int | None = None,
        labels_key: str = "labels",
        shift: bool = True,
        ignore_index: int = -100,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        nonfinite: NonFinitePolicy = "raise",
        sample_id_key: str = SAMPLE_ID_KEY,
        token_weighting: TokenScope = "global",
        store_fields: Sequence[str] = (),
    ) -> None:
        super().__init__(nonfinite=nonfinite, sample_id_key=sample_id_key, token_weighting=token_weighting, store_fields=store_fields)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        if (reference_model is None) == (reference_loss is None):
            raise ValueError("give SelectiveTokens exactly one of reference_model= (a causal LM) or reference_loss= (a function)")
        if token_weighting != "global":
            raise ValueError(
                "SelectiveTokens selects the top tokens of the global batch, so its loss is divided by the global count of"
                " selected tokens: token_weighting must be 'global' (give the other weightwise callbacks"
                " token_weighting='global' too)"
            )
        self.reference_model = reference_model
        self.reference_loss = reference_loss
        self.keep = keep
        self._scorer = None
        if reference_model is not None:
            options = dict(labels_key=labels_key, shift=shift, ignore_index=ignore_index, chunk_tokens=chunk_tokens)
            self._scorer = ReferenceLosses(reference_model, **options)
        if reference_params is None and reference_model is not None:
            reference_params = sum(p.numel() for p in reference_model.parameters())
        self.reference_params = reference_params or 0
        self._given_back: tuple[torch.device, bool] | None = None  # the reference's device and mode before the fit

    def _settings(self) -> dict[str, Any]:
        return {"keep": self.keep}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.reference_model is None:
            return
        check_same_tokenizer(pl_module, self.reference_model)
        first = next(self.reference_model.parameters(), None)
        self._given_back = (first.device if first is not None else torch.device("cpu"), self.reference_model.training)
        self.reference_model.to(pl_module.device).eval()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._give_back()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._give_back()  # Lightning calls no teardown hook when fit raises

    def _give_back(self) -> None:
        if self.reference_model is not None and self._given_back is not None:
            device, training = self._given_back
            self.reference_model.to(device).train(training)
            self._given_back = None

    def reference_losses(self, batch: Any) -> tuple[Tensor, Tensor]:
        """The reference model's token losses and mask on ``batch``, without gradients."""
        with torch.no_grad():
            return self._scorer(batch) if self._scorer is not None else self.reference_loss(batch)  # type: ignore[misc]

    @override
    def token_weights(self, token_losses: Tensor, mask: Tensor, batch: Any, trainer: pl.Trainer) -> Tensor:
        reference, reference_mask = self.reference_losses(batch)
        scores = excess_losses(token_losses, reference)
        if not torch.equal(reference_mask.to(mask.device), mask):
            raise ValueError(
                "the reference model's valid tokens differ from the training step's: compute both token losses from the same"
                " labels, ignore_index and shift"
            )
        selected = top_tokens(scores, mask, self.keep)
        inputs = batch.get("input_ids") if isinstance(batch, Mapping) else None
        local = inputs.numel() if isinstance(inputs, Tensor) else token_losses.numel()  # the positions it forwarded
        positions = collectives.all_reduce_sum(torch.tensor([float(local)], device=token_losses.device))
        forwarded = int(positions.item())
        self.ledger["reference_tokens"] += forwarded
        self.ledger["reference_flops"] += 2 * self.reference_params * forwarded
        return selected.float()


def check_same_tokenizer(model: nn.Module, reference: nn.Module) -> None:
    """Refuse a reference model whose output vocabulary or special token ids (``bos``, ``eos``, ``pad``
    in its config) differ from the trained model's, where both are known.

    Raises:
        ValueError: they differ (the message names both values).
    """
    ours, theirs = output_vocabulary(model), output_vocabulary(reference)
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(
            f"the reference model's vocabulary has {theirs} tokens, the trained model's {ours}: Rho-1's excess loss compares"
            " the two models' losses on the same token ids, so the reference must use the trained model's tokenizer"
        )
    ours_config, theirs_config = _config(model), _config(reference)
    if ours_config is None or theirs_config is None:
        return
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        a, b = getattr(ours_config, name, None), getattr(theirs_config, name, None)
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"the reference model's {name} is {b}, the trained model's {a}: it was trained with another tokenizer,"
                " whose token losses do not compare with the trained model's"
            )


def _config(model: nn.Module) -> Any:
    """The first transformers-style config (one with ``vocab_size``) on the model or its submodules."""
    return next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "vocab_size")), None)
