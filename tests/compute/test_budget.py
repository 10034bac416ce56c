"""ComputeBudget in real Lightning fits: where it stops, resume, accumulation, what it counts, schedules, errors."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from tests.support.models import Classifier, TinyLlama, TokenLossLM, indexed_loader, token_batches
from tests.support.training import flat_params, trainer
from weightwise.callbacks import DataPruning, OnlineBatchSelection
from weightwise.compute import ComputeBudget, budget_lr_lambda, find_budget, lr_factor
from weightwise.samplers import ScorePruningSampler


def llama_fit(callbacks, layers=2, samples=16, ckpt=None, **kwargs):
    model = TinyLlama(layers=layers)
    fit = trainer(max_epochs=-1, callbacks=callbacks, **kwargs)
    fit.fit(model, token_batches(samples, 16), ckpt_path=ckpt)
    return model, fit


@pytest.fixture(scope="module")
def step_flops():
    """FLOPs of one optimizer step of the tiny Llama on 2 x 16 tokens (measured by a budget run)."""
    budget = ComputeBudget(flops=1e15)
    llama_fit([budget], max_steps=2)
    return budget.spent.flops // 2


def test_stops_after_the_step_that_spends_the_budget_and_trains_bit_identically(step_flops):
    budget = ComputeBudget(flops=3.5 * step_flops)
    model, fit = llama_fit([budget])
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # the module as the user gave it
    assert fit.global_step == 4  # steps 1-3 spend 3 x, the 4th reaches the budget: at most one step past it
    assert budget.spent.flops == 4 * step_flops and budget.fraction == 1.0
    assert budget.spent.tokens == budget.spent.backward_tokens == 4 * 2 * 16
    assert budget.spent.flops_saved == 0  # plain training saves nothing
    plain, _ = llama_fit([], max_steps=4)
    assert torch.equal(flat_params(model), flat_params(plain))  # counting changed nothing


def test_resume_from_a_mid_run_checkpoint_stops_where_the_uninterrupted_run_does(tmp_path, step_flops):
    whole = ComputeBudget(flops=5.5 * step_flops)
    model, fit = llama_fit([whole], samples=8)  # 4 steps an epoch: stopped after the first, resumed in the second
    first = ComputeBudget(flops=5.5 * step_flops)
    llama_fit([first, ModelCheckpoint(dirpath=tmp_path, save_last=True)], samples=8, max_steps=4, enable_checkpointing=True)
    resumed_budget = ComputeBudget(flops=5.5 * step_flops)
    resumed, resumed_fit = llama_fit([resumed_budget], samples=8, ckpt=tmp_path / "last.ckpt")
    assert fit.global_step == resumed_fit.global_step == 6
    assert resumed_budget.spent == whole.spent
    assert torch.equal(flat_params(resumed), flat_params(model))


def test_accumulation_counts_every_micro_batch(step_flops):
    budget = ComputeBudget(flops=3 * step_flops)
    _, fit = llama_fit([budget], accumulate_grad_batches=2)
    assert fit.global_step == 2  # each optimizer step is two micro-batches: 2 steps spend 4 x
    assert budget.spent.flops == 4 * step_flops


def test_online_selection_extra_forward_and_reference_model_are_counted():
    reference = torch.nn.Linear(16, 16)
    reference_flops = 2 * 2 * 16 * 16  # one [2, 16] x [16, 16] product a batch
    budget = ComputeBudget(flops=1e15)
    selection = OnlineBatchSelection(
        keep=0.5, method="top", start=0, end=10, interrupt=0,
        reference_loss=lambda batch: reference(batch["input_ids"].float()).mean(dim=1),
    )
    model = TokenLossLM(layers=2)
    trainer(max_steps=3, callbacks=[selection, budget]).fit(model, token_batches(16, 16))
    spent = budget.spent
    assert spent.by_source["reference_model"] == 3 * reference_flops
    # the no-grad pass sees both rows, the step with gradients one: the extra forward is twice the step's
    model_forward = spent.model_forward_flops
    assert spent.by_source["selection_forward"] == 2 * model_forward > 0
    assert spent.backward_tokens == spent.tokens // 2 == 3 * 16
    # plain training would forward and backpropagate both rows (2 x 3 x the kept row's forward); this run
    # spent the kept row's forward and backward (3 x), the extra forward and the reference model
    plain = 2 * 3 * model_forward
    assert spent.flops_saved == plain - 3 * model_forward - spent.by_source["selection_forward"] - 3 * reference_flops


def test_scoring_passes_are_counted():
    budget = ComputeBudget(flops=1e15)
    sampler = ScorePruningSampler(32, keep_fraction=0.5, warmup_epochs=0, score="el2n")
    model = Classifier(el2n=True)
    trainer(max_epochs=1, callbacks=[DataPruning(), budget], use_distributed_sampler=False).fit(
        model, indexed_loader(32, 8, sampler=sampler)
    )
    per_sample = 2 * (8 * 16 + 16 * 3)
    assert budget.spent.by_source["scoring"] == 32 * per_sample  # one pass over the whole training set
    assert budget.spent.model_forward_flops == 16 * per_sample  # the kept half trained


def test_budget_schedule_ends_at_the_budget_whatever_the_step_count():
    """Data Diet pruning halves the epoch and rescores every epoch: the same budget buys fewer steps, and
    the schedule still ends at the budget."""

    class Scheduled(Classifier):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, budget_lr_lambda(find_budget(self.trainer), "cosine", warmup_fraction=0.1, final_lr_fraction=0.05))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    steps = {}
    for pruned in (False, True):
        budget = ComputeBudget(flops=200_000)
        sampler = ScorePruningSampler(64, keep_fraction=0.5, warmup_epochs=0, rescore_every=1, score="el2n") if pruned else None
        model = Scheduled(per_sample=pruned, el2n=pruned, lr=0.1)
        callbacks = [DataPruning(), budget] if pruned else [budget]
        fit = trainer(max_epochs=-1, callbacks=callbacks, use_distributed_sampler=False)
        fit.fit(model, indexed_loader(64, 8, sampler=sampler))
        steps[pruned] = fit.global_step
        assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.05, rel=1e-12, abs=0)
        assert budget.fraction == 1.0
    assert steps[True] < steps[False]  # the scoring passes cost FLOPs: fewer steps
    assert lr_factor(0.55, "cosine", warmup_fraction=0.1) == pytest.approx(0.5, rel=1e-12, abs=0)


def test_schedule_shapes():
    assert lr_factor(0.05, "linear", warmup_fraction=0.1) == pytest.approx(0.5, rel=1e-12, abs=0)
    assert lr_factor(0.7, "wsd", decay_fraction=0.2, final_lr_fraction=0.0) == 1.0
    assert lr_factor(0.9, "wsd", decay_fraction=0.2, final_lr_fraction=0.0) == pytest.approx(0.5, rel=1e-12, abs=0)
    assert lr_factor(1.3, "linear", final_lr_fraction=0.2) == pytest.approx(0.2, rel=1e-12, abs=0)
    with pytest.raises(ValueError, match="overlap"):
        lr_factor(0.5, "wsd", warmup_fraction=0.5, decay_fraction=0.6)


def test_logs_flops(tmp_path):
    budget = ComputeBudget(tokens=6 * 32)
    llama_fit([budget], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for name in ("weightwise/flops", "weightwise/flops_forward", "weightwise/flops_backward", "weightwise/flops_saved", "weightwise/budget_fraction"):
        assert name in header
    last = dict(zip(header, metrics[-1].split(",")))
    assert float(last["weightwise/flops"]) == pytest.approx(budget.spent.flops, rel=1e-6, abs=0)
    assert float(last["weightwise/budget_fraction"]) == 1.0


def test_bad_budgets(step_flops):
    for kwargs in ({}, {"flops": 1e9, "tokens": 10}):
        with pytest.raises(ValueError, match="exactly one unit"):
            ComputeBudget(**kwargs)
    with pytest.raises(ValueError, match="positive"):
        ComputeBudget(tokens=0)
    hooks_before = len(torch.nn.modules.module._global_forward_pre_hooks)
    with pytest.raises(MisconfigurationException, match="smaller than the first optimizer step"):
        llama_fit([ComputeBudget(flops=step_flops / 2)])
    assert len(torch.nn.modules.module._global_forward_pre_hooks) == hooks_before  # a raising fit leaves no hook behind

    class NoProducts(Classifier):  # elementwise only: nothing FlopCounterMode counts
        def __init__(self):
            super().__init__(per_sample=False)
            self.scale = torch.nn.Parameter(torch.ones(8))

        def training_step(self, batch, batch_idx):
            return (batch[0] * self.scale).pow(2).mean()

    with pytest.raises(MisconfigurationException, match="counted no FLOPs"):
        trainer(max_epochs=1, callbacks=[ComputeBudget(flops=1e9)]).fit(NoProducts(), indexed_loader(16, 8))
    with pytest.raises(MisconfigurationException, match="tokens_of"):
        loader = DataLoader([{"text": "abc"}] * 4, batch_size=2, collate_fn=lambda items: items)
        trainer(max_epochs=1, callbacks=[ComputeBudget(tokens=100)]).fit(Classifier(), loader)


def test_ist_probes_and_frozen_layers_under_the_rule():
    """IST's probes are counted as "probes"; with a quarter of the layers trainable the backward costs less than 2x."""
    from weightwise.callbacks import LayerwiseSampling

    budget = ComputeBudget(flops=1e15)
    sampling = LayerwiseSampling("ist", probe_every=2, seed=0)
    model = TinyLlama(layers=4)
    trainer(max_steps=4, callbacks=[sampling, budget]).fit(model, token_batches())
    spent = budget.spent
    assert spent.by_source["probes"] > 0  # probes at steps 2 and 4 (3 each)
    assert spent.model_forward_flops < spent.backward_flops < 2 * spent.model_forward_flops
    assert spent.by_source["model"] == spent.model_forward_flops + spent.backward_flops
    assert sum(spent.by_source.values()) == spent.flops


def test_wandb_plots_against_flops(monkeypatch, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    calls = []

    class Run:
        def define_metric(self, name, **options):
            calls.append((name, options))

    monkeypatch.setattr(WandbLogger, "experiment", property(lambda self: Run()))
    fit = trainer(logger=WandbLogger(save_dir=tmp_path, offline=True))
    ComputeBudget(flops=1e9)._define_wandb_axis(fit)
    assert calls == [("weightwise/flops", {}), ("*", {"step_metric": "weightwise/flops", "step_sync": True})]
