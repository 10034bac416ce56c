"""DomainMixing in real Lightning fits: monitoring, exact resume, token losses, accumulation, composition, bad input."""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, seed_everything
from torch.utils.data import DataLoader

from tests.support.models import Classifier, TokenLossLM, blobs, real_bytes
from tests.support.training import flat_params, trainer
from weightwise import IndexedDataset
from weightwise.callbacks import ComputeBudget, LossReweighting
from weightwise.mixing import (
    ODM,
    Aioli,
    DomainMixing,
    DoReMi,
    FixedMixture,
    MixingStream,
    MixtureBatchSampler,
    document_domains,
    held_out_losses,
)
from weightwise.mixing.policies import MixingPolicy

N = 60
DOMAINS = (torch.arange(N) % 3 == 0).long()  # 40 of domain 0, 20 of domain 1


class Drawn(Callback):
    """What each step trained on: the batch's sample ids (map-style) or values (stream), and the mixture."""

    def __init__(self, mixing=None):
        self.batches, self.weights, self.mixing = [], [], mixing

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch.sample_id.tolist() if hasattr(batch, "sample_id") else batch["x"].flatten().tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.mixing is not None:
            self.weights.append(self.mixing.weights.clone())


def mapped_fit(steps, policy=None, ckpt_path=None, save=None, extra=(), accumulate=1, **fit_options):
    seed_everything(0)
    sampler = MixtureBatchSampler(DOMAINS, batch_size=6, names=["big", "small"], num_batches=5, num_replicas=1, rank=0)
    mixing = DomainMixing(policy or ODM(2, sampler.sizes, warmup_steps=0, smoothing=0.5), sampler)
    drawn = Drawn(mixing)
    model = Classifier(lr=0.5)
    fit = trainer(
        max_steps=steps, callbacks=[mixing, drawn, *extra], use_distributed_sampler=False, log_every_n_steps=1,
        max_epochs=-1, accumulate_grad_batches=accumulate, **fit_options,
    )  # fmt: skip
    fit.fit(model, DataLoader(IndexedDataset(blobs(N)), batch_sampler=sampler), ckpt_path=ckpt_path)
    if save:
        fit.save_checkpoint(save)
    return fit, mixing, drawn, model


def test_a_fit_logs_the_mixture_and_counts_tokens_per_domain():
    fit, mixing, drawn, _ = mapped_fit(8)
    names = {
        "weightwise/domain_weight/big",
        "weightwise/domain_weight/small",
        "weightwise/domain_tokens/big",
        "weightwise/domain_tokens/small",
    }
    assert names <= set(fit.logged_metrics)
    drawn_domains = torch.tensor([int(DOMAINS[i]) for batch in drawn.batches for i in batch])
    assert mixing.ledger["samples"].tolist() == [float((drawn_domains == d).sum()) for d in (0, 1)]
    assert float(fit.logged_metrics["weightwise/domain_tokens/small"]) == mixing.ledger["tokens"][1]
    assert float(fit.logged_metrics["weightwise/domain_weight/big"]) == pytest.approx(float(mixing.weights[0]))
    assert len({tuple(w.tolist()) for w in drawn.weights}) > 2  # the policy moved the mixture


def test_a_resumed_fit_draws_and_decides_exactly_as_the_uninterrupted_one(tmp_path):
    _, whole, whole_drawn, whole_model = mapped_fit(9)
    mapped_fit(4, save=tmp_path / "four.ckpt")  # mid-epoch (5 batches an epoch)
    _, resumed, resumed_drawn, resumed_model = mapped_fit(9, ckpt_path=tmp_path / "four.ckpt")
    assert resumed_drawn.batches == whole_drawn.batches[4:]
    assert torch.equal(resumed.weights, whole.weights) and torch.equal(resumed.policy.rewards, whole.policy.rewards)
    assert torch.equal(resumed.ledger["tokens"], whole.ledger["tokens"])
    assert torch.equal(flat_params(resumed_model), flat_params(whole_model))


class StreamClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")


def domain_rows(d):
    data = blobs(N)
    return [{"x": data[i][0], "y": data[i][1]} for i in range(N) if int(DOMAINS[i]) == d]


def stream_fit(steps, ckpt_path=None, save=None, workers=0):
    seed_everything(0)
    stream = MixingStream({"big": domain_rows(0), "small": domain_rows(1)}, batch_size=4, num_replicas=1, rank=0)
    mixing = DomainMixing(ODM(2, warmup_steps=0), stream, delay=1 + 2 * workers)
    drawn = Drawn(mixing)
    model = StreamClassifier(lr=0.5)
    fit = trainer(max_steps=steps, callbacks=[mixing, drawn], limit_train_batches=5, max_epochs=-1)
    fit.fit(model, DataLoader(stream, batch_size=4, num_workers=workers), ckpt_path=ckpt_path)
    if save:
        fit.save_checkpoint(save)
    return mixing, drawn, model


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_resumed_stream_continues_from_the_trained_positions(tmp_path, workers):
    """With workers, the weights reach the worker processes through the shared table, and each
    epoch's new workers start from the positions of the trained batches."""
    whole, whole_drawn, whole_model = stream_fit(9, workers=workers)
    stream_fit(3, save=tmp_path / "three.ckpt", workers=workers)
    resumed, resumed_drawn, resumed_model = stream_fit(9, ckpt_path=tmp_path / "three.ckpt", workers=workers)
    assert resumed_drawn.batches == whole_drawn.batches[3:]
    assert torch.equal(resumed.source.positions, whole.source.positions)
    assert torch.equal(resumed.weights, whole.weights) and torch.equal(flat_params(resumed_model), flat_params(whole_model))


class PackedDomainsLM(TokenLossLM):
    """Packed rows (documents every 5 tokens) of one domain each: the documents' domains from the row's."""

    def __init__(self):
        super().__init__("packed", layers=1)

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        documents = out["position_ids"].eq(0).long().cumsum(1) - 1
        return {**out, "domain_ids": document_domains(batch["domain_id"], out["mask"], documents)}


def test_packed_documents_are_weighted_by_tokens_per_domain():
    text = (real_bytes(40 * 16) % 64).view(40, 16)
    rows = lambda d: [{"input_ids": row} for row in text[d::2]]  # noqa: E731
    stream = MixingStream({"even": rows(0), "odd": rows(1)}, batch_size=2, num_replicas=1, rank=0)
    mixing = DomainMixing(ODM(2, warmup_steps=0), stream)
    fit = trainer(max_steps=4, callbacks=[mixing])
    fit.fit(PackedDomainsLM(), DataLoader(stream, batch_size=2))
    assert float(mixing.ledger["tokens"].sum()) == 4 * 2 * 15  # every target token of the 8 rows, once
    assert mixing.ledger["samples"].sum() == 4 * 2 * 3  # 3 documents a row


class Steps(MixingPolicy):
    def __init__(self):
        super().__init__(2)
        self.seen = []

    def update(self, step, stats, evaluate=None):
        self.seen.append((step, stats.samples.sum().item()))
        return self.weights


def test_gradient_accumulation_updates_once_per_optimizer_step_with_all_micro_batches():
    policy = Steps()
    mapped_fit(3, policy=policy, accumulate=2)
    # 5 micro-batches of 6 an epoch: Lightning steps after 2, 4 and - at the epoch's end - 5.
    assert policy.seen == [(1, 12.0), (2, 12.0), (3, 6.0)]


def test_mixing_adds_no_loss_weight_so_it_composes_with_reweighting():
    with_mixing = mapped_fit(5, policy=FixedMixture(2), extra=[LossReweighting("linupper", warmup_steps=0)])
    seed_everything(0)
    sampler = MixtureBatchSampler(DOMAINS, batch_size=6, weights=[0.5, 0.5], num_batches=5, num_replicas=1, rank=0)
    model = Classifier(lr=0.5)
    trainer(max_steps=5, callbacks=[LossReweighting("linupper", warmup_steps=0)], use_distributed_sampler=False).fit(
        model, DataLoader(IndexedDataset(blobs(N)), batch_sampler=sampler)
    )
    assert torch.equal(flat_params(with_mixing[3]), flat_params(model))


class NaNPolicy(MixingPolicy):
    def update(self, step, stats, evaluate=None):
        return torch.tensor([float("nan"), 1.0], dtype=torch.float64)


def test_bad_input_stops_with_errors_that_name_the_fix():
    with pytest.raises(FloatingPointError, match="not finite"):
        mapped_fit(2, policy=NaNPolicy(2))
    with pytest.raises(ValueError, match=r"delay=3"):  # 1 + 1 worker x prefetch 2
        _mapped_with_workers()
    stream = MixingStream({"a": domain_rows(0), "b": domain_rows(1)}, batch_size=4, num_replicas=1, rank=0)

    class Unknown(StreamClassifier):
        def training_step(self, batch, batch_idx):
            return {"loss": super().training_step(batch, batch_idx), "domain_ids": batch["domain_id"] + 5}

    with pytest.raises(ValueError, match="unknown domain ids"):
        trainer(max_steps=1, callbacks=[DomainMixing(ODM(2), stream)]).fit(Unknown(), DataLoader(stream, batch_size=4))
    bare = MixingStream({"a": domain_rows(0), "b": domain_rows(1)}, batch_size=4, num_replicas=1, rank=0, domain_key="domain")

    class Dropped(StreamClassifier):
        def training_step(self, batch, batch_idx):
            batch.pop("domain")
            return super().training_step(batch, batch_idx)

    with pytest.raises(ValueError, match="one domain id per sample"):
        trainer(max_steps=1, callbacks=[DomainMixing(ODM(2), bare)]).fit(Dropped(), DataLoader(bare, batch_size=4))


def _mapped_with_workers():
    sampler = MixtureBatchSampler(DOMAINS, batch_size=6, num_batches=5, num_replicas=1, rank=0)
    loader = DataLoader(IndexedDataset(blobs(N)), batch_sampler=sampler, num_workers=1)
    trainer(max_steps=1, callbacks=[DomainMixing(FixedMixture(2), sampler)], use_distributed_sampler=False).fit(
        Classifier(), loader
    )


def test_collapse_is_warned_once_and_logged():
    with pytest.warns(UserWarning, match="collapsed onto 'big'"):
        fit, mixing, _, _ = mapped_fit(3, policy=FixedMixture(2, [0.99, 0.01]))
    assert float(fit.logged_metrics["weightwise/mixing/collapsed"]) == 1.0
    floored = DomainMixing(FixedMixture(2, [1.0, 0.0]), MixtureBatchSampler(DOMAINS, batch_size=2), min_weight=0.1)
    assert floored.weights.tolist() == pytest.approx([0.9, 0.1])


class WithReference(Classifier):
    """Returns DoReMi's signal: each sample's loss above a frozen reference model's (clipped at 0)."""

    def __init__(self):
        super().__init__(lr=0.5)
        self.reference = Classifier().net.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        with torch.no_grad():
            excess = (losses.detach() - F.cross_entropy(self.reference(x), y, reduction="none")).clamp(min=0)
        return {"loss": losses, "scores": {"excess_loss": excess}}


def test_doremi_reads_the_excess_loss_and_counts_the_reference_forwards():
    seed_everything(0)
    sampler = MixtureBatchSampler(DOMAINS, batch_size=6, num_batches=5, num_replicas=1, rank=0)
    mixing = DomainMixing(DoReMi(2), sampler)
    trainer(max_steps=4, callbacks=[mixing], use_distributed_sampler=False).fit(
        WithReference(), DataLoader(IndexedDataset(blobs(N)), batch_sampler=sampler)
    )
    assert mixing.reference_tokens == 4 * 6 and mixing.policy.updates == 4
    assert not torch.equal(mixing.weights, torch.full((2,), 0.5, dtype=torch.float64))


def test_aioli_probes_with_held_out_losses_inside_a_fit():
    seed_everything(0)
    data = blobs(N)
    held_out = [DataLoader([data[i] for i in range(N) if int(DOMAINS[i]) == d], batch_size=16) for d in (0, 1)]
    sampler = MixtureBatchSampler(DOMAINS, batch_size=6, num_batches=5, num_replicas=1, rank=0)
    model = Classifier(lr=0.5)
    loss_fn = lambda module, batch: F.cross_entropy(module.net(batch[0]), batch[1], reduction="none")  # noqa: E731
    policy = Aioli(2, lp_rounds=1, lp_steps=1, round_steps=4)
    mixing = DomainMixing(policy, sampler, evaluate=held_out_losses(held_out, loss_fn, model))
    drawn = Drawn(mixing)
    budget = ComputeBudget(flops=1e18)
    trainer(max_steps=8, callbacks=[mixing, drawn, budget], use_distributed_sampler=False, max_epochs=-1).fit(
        model, DataLoader(IndexedDataset(blobs(N)), batch_sampler=sampler)
    )
    assert policy.evaluations == 1 + 2 + 1 + 2 + 1  # start, two bursts, the next round's start, ...
    assert budget.spent.by_source["probes"] > 0  # the held-out forwards are counted as Aioli's cost
    assert policy.rounds_done == 2 and model.training
    probes = [int(w.argmax()) for w in drawn.weights[:2]]
    assert sorted(probes) == [0, 1] and max(drawn.weights[0]) == pytest.approx(0.625)
