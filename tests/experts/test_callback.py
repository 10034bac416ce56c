"""ExpertUpcycling in real Trainer runs with a tiny Mixtral on real text (Python's own sources)."""

import csv

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from tests.support.models import TinyMoELM
from tests.support.models import moe_loader as loader
from tests.support.training import trainer
from weightwise.callbacks import ExpertUpcycling
from weightwise.experts import find_moe_blocks


def test_upcycles_mid_fit_keeps_the_function_and_training_goes_on(tmp_path):
    module = TinyMoELM(top_k=1)
    callback = ExpertUpcycling(at_step=3, factor=2, method="duplicate", router_noise=0.0)
    fit = trainer(max_epochs=2, max_steps=8, callbacks=[callback], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    fit.fit(module, loader())
    assert callback.done and callback.report.num_experts == (4, 8)
    assert module.model.config.num_experts == 8
    before, after = callback.measurements["before"], callback.measurements["after"]
    assert abs(before["loss"] - after["loss"]) <= 1e-5  # top-1, renormalised: exact
    assert fit.global_step == 8  # training continued with the grown model and the same optimizer
    optimizer = fit.optimizers[0]
    block = next(iter(find_moe_blocks(module).values()))
    assert optimizer.state[block.expert_parameters()["down_proj"]]["exp_avg"].shape[0] == 8
    assert fit.lr_scheduler_configs[0].scheduler.last_epoch == 8  # the LR schedule continued
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert any(r.get("weightwise/upcycle_loss_after") for r in rows)


def test_utility_selection_and_granular_through_the_callback():
    utility_cb = ExpertUpcycling(at_step=4, factor=2, selection="utility", utility_window=3, router_noise=0.0)
    trainer(max_steps=5, callbacks=[utility_cb]).fit(TinyMoELM(top_k=1), loader())
    assert utility_cb.utility.steps == 3
    copies = next(iter(utility_cb.report.copies.values()))
    assert copies.sum() == 8 and (copies >= 1).all()

    granular = ExpertUpcycling(at_step=2, factor=2, method="granular")
    trainer(max_steps=4, callbacks=[granular]).fit(TinyMoELM(top_k=2), loader())
    assert granular.report.top_k == (2, 4)
    assert abs(granular.measurements["before"]["loss"] - granular.measurements["after"]["loss"]) <= 1e-5


def test_resume_from_a_checkpoint_written_after_upcycling(tmp_path):
    checkpointing = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, callbacks=[ExpertUpcycling(at_step=2), checkpointing], enable_checkpointing=True).fit(
        TinyMoELM(), loader()
    )
    resumed_cb = ExpertUpcycling(at_step=2)
    module = TinyMoELM()  # built with 4 experts; the checkpoint holds 8
    fit = trainer(max_epochs=2, callbacks=[resumed_cb])
    fit.fit(module, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed_cb.done and resumed_cb.report is None  # not upcycled a second time
    assert module.model.config.num_experts == 8 and fit.global_step == 12


def test_defaults_follow_the_reference_where_a_choice_exists():
    duplicate, granular, early = ExpertUpcycling(at_step=100), ExpertUpcycling(at_step=100, method="granular"), ExpertUpcycling(at_step=5)
    assert (duplicate.selection, duplicate.utility_window) == ("utility", 20)  # copies by utility, averaged over 20 steps
    assert granular.selection == "uniform"  # a split treats every expert alike: no choice to make
    assert early.utility_window == 5  # the window never reaches before the run's first step


def test_refuses_bad_settings():
    with pytest.raises(ValueError, match="at_step"):
        ExpertUpcycling(at_step=0)
