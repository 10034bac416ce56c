"""Token-level weighting and selection: DFT and Rho-1 against transcriptions of their references,
the one combined weight at token granularity, the ledger, and bad input."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from transformers import LlamaConfig, LlamaForCausalLM

from tests.support.models import TokenLossLM, padded_token_batches
from tests.support.training import flat_params, trainer
from tests.weighting.test_tokens import _LargeAllocations
from weightwise.callbacks import LossReweighting, SelectiveTokens, TokenWeighting
from weightwise.losses import (
    dft_weights,
    loss_weights,
    reduce_token_losses,
    reduce_weighted_token_losses,
    reference_token_losses,
    token_cross_entropy,
    token_shares,
    top_tokens,
    weighted_mean,
)

VOCAB = 64


def tiny_reference(seed: int = 1, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config}))


def fit(module: pl.LightningModule, callbacks: list, steps: int = 3, batches=None, **kwargs) -> torch.Tensor:
    seed_everything(0)
    trainer(max_steps=steps, callbacks=callbacks, **kwargs).fit(module, batches or padded_token_batches(n=12))
    return flat_params(module)


# ---------------------------------------------------------------- uniform = plain training


@pytest.mark.parametrize("mode", ["tokens", "packed"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_uniform_token_weights_train_exactly_like_the_token_mean(mode, accumulate):
    """Factor 1 on every token: bit for bit the existing token path (LossReweighting("uniform")), padding,
    packed documents and accumulation included; and the plain HF loss to float tolerance."""
    uniform_tokens = fit(TokenLossLM(mode), [TokenWeighting("uniform")], accumulate_grad_batches=accumulate)
    uniform_samples = fit(TokenLossLM(mode), [LossReweighting("uniform", token_weighting="global")], accumulate_grad_batches=accumulate)
    assert torch.equal(uniform_tokens, uniform_samples)
    if mode == "tokens":
        plain = fit(TokenLossLM("plain"), [], accumulate_grad_batches=accumulate)
        torch.testing.assert_close(uniform_tokens, plain)


# ---------------------------------------------------------------- DFT against its authors' code


class DFTReference(TokenLossLM):
    """DFT's loss transcribed from yongliang-wu/DFT, verl/verl/trainer/fsdp_dft_trainer.py,
    _compute_loss_and_backward (no sequence parallelism, balance_dp_token=False): a scalar loss, no
    weightwise callback."""

    def training_step(self, batch, batch_idx):
        labels = batch["labels"]
        logits = self.model(input_ids=batch["input_ids"]).logits
        loss_mask = (labels[:, 1:] != -100).reshape(-1)
        shift_logits = logits[..., :-1, :].contiguous().view(-1, VOCAB)
        shift_labels = labels[:, 1:].contiguous().view(-1).clamp(min=0)  # the reference masks by loss_mask, not -100
        loss = F.cross_entropy(shift_logits, shift_labels, reduction="none")
        probs = torch.softmax(shift_logits, dim=-1)
        prob_coefficients = probs.gather(1, shift_labels.unsqueeze(-1)).squeeze(-1)
        loss = loss * prob_coefficients.detach()
        loss = loss * loss_mask.to(loss.device)
        valid_token_this_rank = torch.sum(loss_mask)
        return torch.sum(loss) / (valid_token_this_rank + 1e-8)


@pytest.mark.parametrize("scope", ["global", "rank"])
def test_dft_trains_like_the_authors_loss(scope):
    ours = fit(TokenLossLM(), [TokenWeighting("dft", token_weighting=scope)])
    reference = fit(DFTReference(), [])
    uniform = fit(TokenLossLM(), [TokenWeighting("uniform")])
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, uniform, rtol=0, atol=1e-4)  # the factor mattered


def test_dft_weight_is_the_detached_probability_of_the_label():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = -100
    losses, mask = token_cross_entropy(logits, labels)
    weights = dft_weights(losses, mask)
    probs = torch.softmax(logits.detach(), dim=-1).gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(weights, torch.where(mask, probs, 0.0))
    assert not weights.requires_grad


# ---------------------------------------------------------------- Rho-1 against the paper


def rho1_transcribed(train_logits, reference_logits, labels, k_percent):
    """Rho-1's selective LM loss, transcribed from the paper (Lin et al., NeurIPS 2024, Sec. 2.2, Eq. 2 and
    "token selection can be implemented by ranking the tokens in a batch according to their excess loss and
    using only the top k% of tokens for training"; microsoft/rho released no training code):
    L_SLM = -1/(N * k%) * sum_i I_k%(x_i) log P(x_i | x_<i; theta), over the batch's N tokens."""
    vocab = train_logits.shape[-1]
    targets = labels[:, 1:].reshape(-1)
    valid = targets != -100
    loss_theta = F.cross_entropy(train_logits[:, :-1].reshape(-1, vocab), targets, reduction="none", ignore_index=-100)[valid]
    loss_ref = F.cross_entropy(reference_logits[:, :-1].reshape(-1, vocab), targets, reduction="none", ignore_index=-100)[valid]
    excess = loss_theta.detach() - loss_ref
    n = excess.numel()
    chosen = torch.topk(excess, int(n * k_percent)).indices
    return loss_theta[chosen].sum() / (n * k_percent), valid.nonzero().squeeze(1)[chosen]


@pytest.mark.parametrize("keep", [0.6, 0.3, 1.0])
def test_rho1_selects_the_papers_tokens_and_its_loss(keep):
    torch.manual_seed(0)
    b, t = 3, 9
    train_logits = torch.randn(b, t, VOCAB, requires_grad=True)
    reference_logits = torch.randn(b, t, VOCAB)
    labels = torch.randint(0, VOCAB, (b, t))
    labels[1, 6:] = -100
    labels[2, 2] = -100
    n = int((labels[:, 1:] != -100).sum())
    keep = keep if int(n * keep) == n * keep else round(int(n * keep) / n, 6)  # k% * N whole, as the paper's formula needs

    expected, expected_positions = rho1_transcribed(train_logits, reference_logits, labels, keep)
    (expected_grad,) = torch.autograd.grad(expected, train_logits)

    losses, mask = token_cross_entropy(train_logits, labels, shift=True)
    reference, _ = token_cross_entropy(reference_logits, labels, shift=True)
    selected = top_tokens(losses.detach() - reference, mask, keep)
    assert sorted(selected.reshape(-1).nonzero().squeeze(1).tolist()) == sorted(expected_positions.tolist())
    objective, chosen = reduce_weighted_token_losses(losses, mask, selected.float())
    _, counts = reduce_token_losses(losses, mask)
    shares = token_shares(counts.float(), torch.zeros(counts.numel()), "global", selected=chosen.float())
    ours = weighted_mean(objective, shares)
    (grad,) = torch.autograd.grad(ours, train_logits)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-9)


def test_reference_token_losses_match_its_logits_without_copying_them():
    """From the reference's hidden states in chunks: no op allocates even half a float32 [B, T - 1, V]
    (the vocabulary, 512, is 8x the model's widest activation, so its logits would show)."""
    vocab, b, t = 512, 2, 12
    reference = tiny_reference(vocab_size=vocab).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (b, t))
    labels = ids.clone()
    labels[0, 8:] = -100
    with torch.no_grad():
        expected, expected_mask = token_cross_entropy(reference(input_ids=ids).logits, labels, shift=True)
    with _LargeAllocations(b * (t - 1) * vocab * 4 // 2, *reference.parameters()) as tracker:  # views of weights allowed
        losses, mask = reference_token_losses(reference, {"input_ids": ids, "labels": labels}, chunk_tokens=4)
    assert tracker.found == []
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- SelectiveTokens in a Trainer


class Recorded(TokenLossLM):
    """Records the scalar loss Lightning backpropagates at each step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.losses = []

    def on_before_backward(self, loss):
        self.losses.append(loss.detach().clone())


def batch_counts(batches, keep):
    valid = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    return valid, [int(keep * v) for v in valid], [b["input_ids"].numel() for b in batches]


def test_selective_tokens_composes_with_loss_reweighting_into_one_weight():
    """Step 1's loss is sum_s w_s sum_t I(t) l_t / N_selected: linupper's sample weights (from each
    sequence's own mean loss) times Rho-1's selection over the batch, divided by the selected count."""
    torch.manual_seed(0)
    module, reference = Recorded(), tiny_reference()
    initial = TokenLossLM()
    batch = next(iter(padded_token_batches(n=12)))
    callbacks = [LossReweighting("linupper", warmup_steps=0, token_weighting="global"), SelectiveTokens(reference)]
    fit(module, callbacks, steps=1)
    with torch.no_grad():
        losses, mask = token_cross_entropy(initial.model(input_ids=batch["input_ids"]).logits, batch["labels"], shift=True)
        reference_losses, _ = token_cross_entropy(reference(input_ids=batch["input_ids"]).logits, batch["labels"], shift=True)
    selected = top_tokens(losses - reference_losses, mask, 0.6)
    means, _ = reduce_token_losses(losses, mask)
    weights = loss_weights(means, "linupper")
    expected = (weights[:, None] * torch.where(selected, losses, 0.0)).sum() / selected.sum()
    torch.testing.assert_close(module.losses[0], expected, rtol=1e-5, atol=0)
    assert not torch.allclose(weights, torch.ones_like(weights))  # both factors were active
    assert 0 < int(selected.sum()) < int(mask.sum())


def test_selective_tokens_ledger_checkpoint_and_the_reference_given_back():
    reference = tiny_reference().train()
    callback = SelectiveTokens(reference, keep=0.5)
    seed_everything(0)
    run = trainer(max_steps=3, callbacks=[callback], log_every_n_steps=1)
    run.fit(TokenLossLM(), padded_token_batches(n=12))
    valid, selected, positions = batch_counts(list(padded_token_batches(n=12))[:3], 0.5)
    assert run.callback_metrics["weightwise/tokens_valid"] == valid[-1]  # logged per step by the reducer
    assert run.callback_metrics["weightwise/tokens_selected"] == selected[-1]
    params = sum(p.numel() for p in reference.parameters())
    assert callback.ledger == {
        "steps": 3, "tokens_valid": sum(valid), "tokens_selected": sum(selected),
        "reference_tokens": sum(positions), "reference_flops": 2 * params * sum(positions),
    }
    assert reference.training  # given back in the mode it came in
    resumed = SelectiveTokens(reference, keep=0.5)
    resumed.load_state_dict(callback.state_dict())
    assert resumed.ledger == callback.ledger
    with pytest.raises(ValueError, match="other SelectiveTokens settings"):
        SelectiveTokens(reference, keep=0.7).load_state_dict(callback.state_dict())


def test_selective_tokens_composes_with_online_batch_selection():
    """The reference scores the rows online selection kept: the ledger counts only those."""
    from weightwise.callbacks import OnlineBatchSelection

    batches = padded_token_batches(n=12, batch_size=4)
    callback = SelectiveTokens(tiny_reference())
    online = OnlineBatchSelection(keep=0.5, method="top", start=0, end=10, interrupt=0, token_weighting="global")
    fit(TokenLossLM(), [online, callback], steps=2, batches=batches)
    assert online.ledger["samples_backpropagated"] == 4
    assert callback.ledger["reference_tokens"] == 4 * next(iter(batches))["input_ids"].shape[1]


# ---------------------------------------------------------------- bad input


def no_valid_tokens():
    rows = [{"input_ids": b["input_ids"][0], "labels": torch.full_like(b["labels"][0], -100)} for b in padded_token_batches(n=4)]
    return torch.utils.data.DataLoader(rows, batch_size=2)


class PerSampleLM(TokenLossLM):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        return reduce_token_losses(out["loss"], out["mask"])[0]


@pytest.mark.parametrize(
    ("module", "callback", "message"),
    [
        (TokenLossLM, lambda: SelectiveTokens(tiny_reference(vocab_size=80)), "vocabulary has 80 tokens"),
        (TokenLossLM, lambda: SelectiveTokens(tiny_reference(eos_token_id=5)), "eos_token_id is 5"),
        (TokenLossLM, lambda: SelectiveTokens(tiny_reference(), keep=0.01), "selects none"),
        ("no valid tokens", lambda: SelectiveTokens(tiny_reference()), "no valid token"),
        ("no valid tokens", lambda: TokenWeighting("dft"), "no valid token"),
        (PerSampleLM, lambda: TokenWeighting("dft"), "returned per-sample losses"),
        (TokenLossLM, lambda: TokenWeighting(lambda losses, mask: -losses), "non-negative weights"),
        (TokenLossLM, lambda: SelectiveTokens(reference_loss=lambda b: (torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))),
         "not shaped like"),
    ],
)
def test_bad_input_stops_with_a_message_naming_the_fix(module, callback, message):
    given, weighting = TokenLossLM() if module == "no valid tokens" else module(), callback()
    reference = getattr(weighting, "reference_model", None)
    if reference is not None:
        reference.train()
    with pytest.raises(ValueError, match=message):
        fit(given, [weighting], steps=1, batches=no_valid_tokens() if module == "no valid tokens" else None)
    assert reference is None or reference.training  # the reference model is given back as it came


def test_bad_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match="token_weighting must be 'global'"):
        SelectiveTokens(tiny_reference(), token_weighting="rank")
    with pytest.raises(ValueError, match="exactly one of"):
        SelectiveTokens()
    with pytest.raises(ValueError, match="keep must be in"):
        SelectiveTokens(tiny_reference(), keep=0.0)
    with pytest.raises(ValueError, match="strategy must be"):
        TokenWeighting("upper")
    with pytest.raises(ValueError, match="outside the reference model's vocabulary"):
        reference_token_losses(tiny_reference(vocab_size=32), {"input_ids": torch.full((1, 4), 40)})
    with pytest.raises(ValueError, match="global batch has no valid token"):
        top_tokens(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool), 0.5)


def test_a_compute_meter_counts_the_whole_reference_pass_as_reference_model():
    """The chunked head is a functional F.linear: run as one module call (ReferenceLosses), the meter
    counts the same FLOPs as the reference's plain forward to logits (decoder + lm_head modules)."""
    from weightwise.compute import ComputeMeter
    from weightwise.weighting.tokens import ReferenceLosses

    reference = tiny_reference().eval()
    batch = next(iter(padded_token_batches(n=4)))
    with ComputeMeter(TokenLossLM()) as meter, torch.no_grad():
        ReferenceLosses(reference, chunk_tokens=5)(batch)
    with ComputeMeter(TokenLossLM()) as plain, torch.no_grad():
        reference(input_ids=batch["input_ids"])
    assert meter.spent.by_source["reference_model"] == plain.spent.by_source["reference_model"] > 0


def test_the_score_store_records_each_samples_own_loss_not_the_token_weighted_one():
    """Token factors shape what is backpropagated; per-sample history (the store, samplers' scores)
    keeps each sequence's plain mean token loss."""
    from weightwise import IndexedDataset

    rows = list(padded_token_batches(n=4, batch_size=1).dataset)
    callback = TokenWeighting("dft", store_fields=("loss",))
    fit(TokenLossLM(), [callback], steps=1, batches=torch.utils.data.DataLoader(IndexedDataset(rows), batch_size=2))
    batch = {k: torch.stack([rows[0][k], rows[1][k]]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        losses, mask = token_cross_entropy(TokenLossLM().model(input_ids=batch["input_ids"]).logits, batch["labels"], shift=True)
    means, _ = reduce_token_losses(losses, mask)
    weighted, _ = reduce_weighted_token_losses(losses, mask, dft_weights(losses, mask))
    stored = callback.reducer.scores.loss[:2]
    torch.testing.assert_close(stored, means, rtol=1e-5, atol=0)
    assert not torch.allclose(stored, weighted, rtol=1e-3, atol=0)


def test_mixed_token_scopes_are_refused_naming_each_callbacks_setting():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="LossReweighting: 'rank', TokenWeighting: 'global'.*default to 'global'"):
        fit(TokenLossLM(), [LossReweighting("linupper"), TokenWeighting("dft")], steps=1)


def test_a_reference_loss_function_trains_like_the_reference_model_it_computes():
    reference = tiny_reference().eval()
    params = sum(p.numel() for p in reference.parameters())

    def reference_loss(batch):
        return token_cross_entropy(reference(input_ids=batch["input_ids"]).logits, batch["labels"], shift=True)

    by_function = SelectiveTokens(reference_loss=reference_loss, reference_params=params)
    by_model = SelectiveTokens(reference)
    torch.testing.assert_close(fit(TokenLossLM(), [by_function]), fit(TokenLossLM(), [by_model]), rtol=0, atol=1e-6)
    assert by_function.ledger == by_model.ledger
