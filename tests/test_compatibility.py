"""Checkpoints written by weightwise 0.1 (before the move to capability folders) still resume.

``tests/fixtures/weightwise_0_1/*.ckpt`` were written by ``tests/fixtures/weightwise_0_1/make.py``
at commit 176cd0c. Each is resumed with today's code and compared with an uninterrupted run of
today's code: the same parameters and the same decisions, so nothing in the saved state was lost
or misread.
"""

from pathlib import Path

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
from weightwise.core.store import FIELDS
from weightwise.samplers import RandomSubsetSampler

FIXTURES = Path(__file__).parent / "fixtures" / "weightwise_0_1"


def test_reweighting_and_mid_epoch_pruning_resume_as_the_uninterrupted_run():
    def run(ckpt_path=None):
        seed_everything(0)
        reweighting, pruning = LossReweighting("linupper", temperature=1.0, warmup_steps=0, store_fields=FIELDS), DataPruning()  # 0.1's defaults
        model = Classifier(optimizer="adamw")
        trainer(max_epochs=4, callbacks=[reweighting, pruning]).fit(
            model, indexed_loader(64, 8, sampler=RandomSubsetSampler(64, fraction=0.5)), ckpt_path=ckpt_path
        )
        return model, pruning

    straight, straight_pruning = run()
    resumed, resumed_pruning = run(FIXTURES / "reweighting_pruning.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight))
    assert resumed_pruning.ledger["samples_visited"] == straight_pruning.ledger["samples_visited"]
    for field in ("loss", "ema", "weight", "count", "last_step"):
        assert torch.equal(getattr(resumed_pruning.reducer.scores, field), getattr(straight_pruning.reducer.scores, field)), field


@pytest.mark.parametrize("fixture, policy", [("lisa", "lisa"), ("ist", "loss_credit")])
def test_layerwise_schedule_and_parked_moments_resume_as_the_uninterrupted_run(fixture, policy):
    """0.1's "ist" is today's "loss_credit" (today's "ist" follows the IST paper)."""

    def run(ckpt_path=None, name=policy):
        seed_everything(0)
        sampling = LayerwiseSampling(name, n_layers=1, interval=3, optimizer_state="offload", seed=1)
        module = TinyLlama(layers=3)
        trainer(max_epochs=4, callbacks=[sampling]).fit(module, token_batches(), ckpt_path=ckpt_path)
        return module, sampling

    straight, straight_sampling = run()
    resumed, resumed_sampling = run(FIXTURES / f"layerwise_{fixture}.ckpt")
    assert resumed_sampling.history == straight_sampling.history
    torch.testing.assert_close(flat_params(resumed), flat_params(straight))
    if fixture == "ist":
        with pytest.raises(ValueError, match="now called 'loss_credit'"):
            run(FIXTURES / "layerwise_ist.ckpt", name="ist")


@pytest.mark.parametrize("checkpoint", ["upcycling_before", "upcycling_after"])
def test_upcycling_resumes_before_and_after_the_surgery(checkpoint):
    def run(ckpt_path=None):
        seed_everything(0)
        callback = ExpertUpcycling(  # weightwise 0.1's utility and allocation
            at_step=3, selection="utility", utility_window=2, utility_metric="taylor", utility_projection="both", allocation="proportional"
        )
        module = TinyMoELM()
        trainer(max_epochs=3, limit_train_batches=2, callbacks=[callback]).fit(module, moe_loader(), ckpt_path=ckpt_path)
        return module, callback

    straight, straight_callback = run()
    resumed, resumed_callback = run(FIXTURES / f"{checkpoint}.ckpt")
    assert resumed.model.config.num_experts == 8
    if checkpoint == "upcycling_before":  # the utility measured before the checkpoint was kept
        for name, copies in straight_callback.report.copies.items():
            assert torch.equal(resumed_callback.report.copies[name], copies)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight))
