"""Checkpoints written by weightwise 0.1 (before the move to capability folders) still resume.

``tests/fixtures/weightwise_0_1/*.ckpt`` were written by ``tests/fixtures/weightwise_0_1/make.py``
at commit 176cd0c, on another machine. Each test resumes one with today's code and checks two things,
so that it passes on any CPU:

* **read** - at the first step of the resumed fit, every field of the 0.1 state is where today's
  code keeps it: parameters, optimizer moments, parked moments, score store, sampler plan, ledger,
  layer schedule, policy scores, utility totals, each compared *bit for bit with the file's own
  values* (loading copies numbers and does no arithmetic, so this is exact on every machine), and
  the settings whose layout changed since 0.1 take the values 0.1 ran with;
* **continue** - the resumed run ends as an uninterrupted run of today's code computed here: the
  same discrete decisions (layers drawn, samples visited, experts copied) exactly, and parameters
  and per-sample statistics within a tolerance. The fixture's numbers were computed on another CPU
  (another SIMD path and BLAS), so they differ from this machine's in the last bits and the
  remaining steps carry that difference on: a bit-exact comparison holds only where the fixtures
  were made. The tolerance (:func:`assert_same_endpoint`) is 1% of the distance the straight run's
  parameters move over the compared steps: the fixtures' rounding differences carried on end at
  1.3e-4 of it at most, while resuming with Adam's moments lost ends at 0.9 of it or more (both
  measured on this machine's default and AVX2 code paths, benchmarks/RESULTS.md "Portable
  compatibility tests"). A schedule or score store read as empty is caught by the exact checks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import seed_everything

from tests.support.models import (
    Classifier,
    TinyLlama,
    TinyMoELM,
    indexed_loader,
    moe_loader,
    token_batches,
)
from tests.support.training import flat_params, trainer
from weightwise.callbacks import (
    DataPruning,
    ExpertUpcycling,
    LayerwiseSampling,
    LossReweighting,
)
from weightwise.core.ids import sample_ids_from_batch
from weightwise.core.store import FIELDS
from weightwise.samplers import RandomSubsetSampler

FIXTURES = Path(__file__).parent / "fixtures" / "weightwise_0_1"

RELATIVE_TOLERANCE = 1e-2
"""Of the straight run's movement over the compared steps: see the module docstring."""


def saved(name: str) -> dict[str, Any]:
    return torch.load(FIXTURES / f"{name}.ckpt", map_location="cpu", weights_only=False)


class AtResume(pl.Callback):
    """Runs ``check(trainer, module)`` once, at the first batch of the fit (after every other callback's
    hook: Lightning calls callbacks in order, so this one goes last); records each step's parameters
    (before the step) and the sample ids of every batch that carries them."""

    def __init__(self, check: Callable[[pl.Trainer, pl.LightningModule], None] | None = None) -> None:
        self.check, self.checked, self.ids, self.params = check, False, [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.params[trainer.global_step] = flat_params(pl_module).clone()
        if isinstance(batch, tuple):
            self.ids.append(sample_ids_from_batch(batch).tolist())
        if self.check is not None and not self.checked:
            self.check(trainer, pl_module)
            self.checked = True


def assert_same_parameters_as_file(module: torch.nn.Module, file: dict[str, Any]) -> None:
    state = module.state_dict()
    assert set(state) == set(file["state_dict"])
    for name, value in file["state_dict"].items():
        assert torch.equal(state[name], value), name


def assert_same_moments_as_file(trainer: pl.Trainer, file: dict[str, Any], params: list[torch.nn.Parameter]) -> None:
    """The optimizer state of each parameter the file holds state for (Lightning keys it by position)."""
    saved_state = file["optimizer_states"][0]["state"]
    live = trainer.optimizers[0].state
    assert saved_state, "the fixture holds optimizer state"
    for index, moments in saved_state.items():
        for key, value in moments.items():
            assert torch.equal(live[params[index]][key], value), (index, key)


def assert_same_endpoint(resumed: torch.nn.Module, straight: torch.nn.Module, probe: AtResume, step: int) -> None:
    """``resumed`` ends where ``straight`` does, up to :data:`RELATIVE_TOLERANCE` of the distance the
    straight run moved from ``step`` (where the resumed run started, or after) to its end."""
    resumed, straight, start = flat_params(resumed), flat_params(straight), probe.params[step]
    moved = (straight - start).norm()
    assert moved > 0
    assert (resumed - straight).norm() <= RELATIVE_TOLERANCE * moved, float((resumed - straight).norm() / moved)


# ---------------------------------------------------------------------- reweighting + mid-epoch pruning
def run_reweighting(ckpt_path: Path | None = None, check: Callable | None = None):
    seed_everything(0)
    reweighting = LossReweighting("linupper", temperature=1.0, warmup_steps=0, store_fields=FIELDS)  # 0.1's defaults
    pruning, probe = DataPruning(), AtResume(check)
    model = Classifier(optimizer="adamw")
    trainer(max_epochs=4, callbacks=[reweighting, pruning, probe]).fit(
        model, indexed_loader(64, 8, sampler=RandomSubsetSampler(64, fraction=0.5)), ckpt_path=ckpt_path
    )
    return model, reweighting, pruning, probe


def test_reweighting_and_mid_epoch_pruning_state_of_0_1_is_read_and_resumes_as_the_uninterrupted_run():
    file = saved("reweighting_pruning")
    old_pruning, old_store = file["callbacks"]["DataPruning"], file["weightwise"]["scores"]

    def check(trainer: pl.Trainer, module: pl.LightningModule) -> None:
        reweighting, pruning = trainer.callbacks[0], trainer.callbacks[1]
        assert trainer.global_step == file["global_step"] == 10
        assert_same_parameters_as_file(module, file)
        assert_same_moments_as_file(trainer, file, list(module.parameters()))
        # LossReweighting 0.1 had no warm-up and normalised per batch: the settings it ran with.
        assert (reweighting.strategy, reweighting.delta, reweighting.temperature) == ("linupper", 1.0, 1.0)
        assert (reweighting.warmup_steps, reweighting.statistic, reweighting._recent) == (0, "batch", None)
        store = pruning.reducer.scores
        assert store.ema_decay == old_store["ema_decay"]
        for field in ("loss", "ema", "weight", "count", "last_step"):  # today's store keeps weights in fp16, as 0.1's did not
            value = getattr(store, field)
            assert torch.equal(value, old_store[field].to(value.dtype)), field
        assert store.weight.dtype == torch.float16 and torch.equal(store.loss, old_store["loss"])
        assert pruning.reducer.nonfinite_dropped == file["weightwise"]["nonfinite_dropped"]
        for key in ("epochs", "samples_visited", "samples_full"):
            assert pruning.ledger[key] == old_pruning["ledger"][key], key
        sampler = pruning.sampler
        assert (sampler.epoch, sampler.seed, sampler.num_samples) == tuple(old_pruning["sampler"][k] for k in ("epoch", "seed", "num_samples"))
        assert torch.equal(sampler.plan.indices, old_pruning["mid_epoch"]["indices"])
        assert pruning._consumed == old_pruning["mid_epoch"]["consumed"] == 16

    straight, _, straight_pruning, straight_probe = run_reweighting()
    resumed, _, resumed_pruning, resumed_probe = run_reweighting(FIXTURES / "reweighting_pruning.ckpt", check)
    assert resumed_probe.checked
    # The interrupted epoch goes on with the saved plan's samples after the 16 consumed ones.
    rest = old_pruning["mid_epoch"]["indices"][16:].tolist()
    assert sum(resumed_probe.ids[: len(rest) // 8], []) == rest
    assert resumed_probe.ids == straight_probe.ids[-len(resumed_probe.ids) :]  # the same samples, in the same order
    assert resumed_pruning.ledger["samples_visited"] == straight_pruning.ledger["samples_visited"]
    assert_same_endpoint(resumed, straight, straight_probe, 10)
    resumed_store, straight_store = resumed_pruning.reducer.scores, straight_pruning.reducer.scores
    for field in ("count", "last_step"):
        assert torch.equal(getattr(resumed_store, field), getattr(straight_store, field)), field
    # Losses and their EMA carry the fixture's rounding on (measured: 1.9e-4 relative at most, on the
    # smallest losses, ~1e-5); a store lost or misread differs by O(1) or in count. Weights are fp16
    # in the store: two of its ulps (2^-10 relative each) allow a rounding that lands on the other side.
    for field, rtol in (("loss", 1e-2), ("ema", 1e-2), ("weight", 2 * 2**-10)):
        torch.testing.assert_close(getattr(resumed_store, field), getattr(straight_store, field), rtol=rtol, atol=0, msg=field)


# ---------------------------------------------------------------------- layer sampling
def run_layerwise(policy: str, ckpt_path: Path | None = None, check: Callable | None = None):
    seed_everything(0)
    sampling, probe = LayerwiseSampling(policy, n_layers=1, interval=3, optimizer_state="offload", seed=1), AtResume(check)
    module = TinyLlama(layers=3)
    trainer(max_epochs=4, callbacks=[sampling, probe]).fit(module, token_batches(), ckpt_path=ckpt_path)
    return module, sampling, probe


def assert_resumes_as_the_uninterrupted_run(fixture: str, policy: str, check: Callable) -> None:
    straight, straight_sampling, straight_probe = run_layerwise(policy)
    resumed, resumed_sampling, resumed_probe = run_layerwise(policy, FIXTURES / f"layerwise_{fixture}.ckpt", check)
    assert resumed_probe.checked
    assert resumed_sampling.history == straight_sampling.history
    assert_same_endpoint(resumed, straight, straight_probe, 8)


def test_lisa_state_of_0_1_is_read_and_resumes_as_the_uninterrupted_run():
    """At step 8 (period 2 of interval 3) layer 1 trains; layer 0 trained in periods 0 and 1, so its
    moments are parked on the CPU; layer 2 never trained."""
    file = saved("layerwise_lisa")
    old = file["callbacks"]["LayerwiseSampling"]

    def check(trainer: pl.Trainer, module: pl.LightningModule) -> None:
        sampling = trainer.callbacks[0]
        assert trainer.global_step == 8
        assert_same_parameters_as_file(module, file)
        assert (sampling.history, sampling._period, sampling.active) == (old["history"], old["period"], old["active"]) == ([[0], [0], [1]], 2, [1])
        layers = module.model.model.layers
        assert [[p.requires_grad for p in layer.parameters()] for layer in layers] == [[False] * 9, [True] * 9, [False] * 9]
        names = dict(module.named_parameters())
        assert len(old["parked"]) == 9 and {names[n] for n in old["parked"]} == set(layers[0].parameters())
        assert set(sampling.stash.parked) == set(layers[0].parameters())
        for name, moments in old["parked"].items():
            for key, value in moments.items():
                assert torch.equal(sampling.stash.parked[names[name]][key], value), (name, key)
        assert_same_moments_as_file(trainer, file, list(module.parameters()))

    assert_resumes_as_the_uninterrupted_run("lisa", "lisa", check)


def test_loss_credit_state_of_0_1_is_read_and_resumes_as_the_uninterrupted_run():
    """0.1's "ist" is today's "loss_credit" (today's "ist" follows the IST paper): its importance
    scores, previous period mean and period losses land in the policy and the period accumulator."""
    file = saved("layerwise_ist")
    old = file["callbacks"]["LayerwiseSampling"]

    def check(trainer: pl.Trainer, module: pl.LightningModule) -> None:
        sampling = trainer.callbacks[0]
        assert_same_parameters_as_file(module, file)
        assert (sampling.history, sampling._period, sampling.active) == (old["history"], old["period"], old["active"])
        assert torch.equal(sampling.chooser.scores, old["importance"])
        assert sampling.chooser.previous_mean == old["previous_mean"]
        assert sampling.chooser.active == old["active"]
        assert sampling._period_loss.dtype == torch.float64
        assert sampling._period_loss.tolist() == [sum(old["period_losses"]), 2.0]
        assert old["parked"] == {} and sampling.stash.parked == {}
        assert_same_moments_as_file(trainer, file, list(module.parameters()))

    assert_resumes_as_the_uninterrupted_run("ist", "loss_credit", check)
    with pytest.raises(ValueError, match="now called 'loss_credit'"):
        run_layerwise("ist", FIXTURES / "layerwise_ist.ckpt")


# ---------------------------------------------------------------------- expert upcycling
def run_upcycling(ckpt_path: Path | None = None, check: Callable | None = None):
    seed_everything(0)
    callback = ExpertUpcycling(  # weightwise 0.1's utility and allocation
        at_step=3, selection="utility", utility_window=2, utility_metric="taylor", utility_projection="both", allocation="proportional"
    )
    module = TinyMoELM()
    probe = AtResume(check)
    trainer(max_epochs=3, limit_train_batches=2, callbacks=[callback, probe]).fit(module, moe_loader(), ckpt_path=ckpt_path)
    return module, callback, probe


@pytest.mark.parametrize("checkpoint", ["upcycling_before", "upcycling_after"])
def test_upcycling_state_of_0_1_is_read_and_resumes_before_and_after_the_surgery(checkpoint):
    """Before the surgery (step 2): 4 experts, the utility window's totals; after it (step 4): the
    module grows to 8 experts before the weights are loaded, and every grown tensor and moment is the file's."""
    file = saved(checkpoint)
    old = file["callbacks"]["ExpertUpcycling"]

    def check(trainer: pl.Trainer, module: pl.LightningModule) -> None:
        callback = trainer.callbacks[0]
        assert trainer.global_step == file["global_step"]
        assert callback.done is old["done"]
        assert module.model.config.num_experts == (8 if old["done"] else 4)
        assert_same_parameters_as_file(module, file)
        assert_same_moments_as_file(trainer, file, list(module.parameters()))
        if not old["done"]:
            assert callback.utility.steps == old["utility"]["steps"] == 1
            assert callback.utility.totals.keys() == old["utility"]["totals"].keys()
            for name, totals in old["utility"]["totals"].items():
                assert torch.equal(callback.utility.totals[name], totals), name
            assert (callback.utility.metric, callback.utility.projection) == ("taylor", "both")

    straight, straight_callback, straight_probe = run_upcycling()
    resumed, resumed_callback, resumed_probe = run_upcycling(FIXTURES / f"{checkpoint}.ckpt", check)
    assert resumed_probe.checked and resumed_callback.done
    assert resumed.model.config.num_experts == 8
    if checkpoint == "upcycling_before":  # the utility measured before the checkpoint chose the same copies
        for name, copies in straight_callback.report.copies.items():
            assert torch.equal(resumed_callback.report.copies[name], copies)
    assert_same_endpoint(resumed, straight, straight_probe, 4)  # step 4: the first after the surgery (the shapes differ before)
