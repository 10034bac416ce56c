"""DenseUpcycling in real Trainer runs: a tiny dense Llama on real text becomes a Mixtral mid-fit."""

import csv

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tests.scripts.dense_jobs import DenseLM
from tests.support.models import moe_loader as loader
from tests.support.training import trainer
from weightwise.callbacks import DenseUpcycling


def test_upcycles_a_dense_model_mid_fit_and_training_goes_on(tmp_path):
    module = DenseLM()
    attention = module.model.model.layers[0].self_attn.q_proj.weight
    callback = DenseUpcycling(at_step=3, num_experts=4, top_k=2)
    fit = trainer(max_steps=6, callbacks=[callback], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    fit.fit(module, loader())
    assert type(module.model).__name__ == "MixtralForCausalLM" and callback.report.exact
    assert abs(callback.losses["before"] - callback.losses["after"]) <= 1e-5  # copies: the dense function
    assert fit.global_step == 6
    optimizer = fit.optimizers[0]
    experts = module.model.model.layers[0].mlp.experts
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in module.parameters()]
    assert optimizer.state[experts.gate_up_proj]["step"] == 3  # fresh at the surgery, trained for 3 steps since
    assert optimizer.state[attention]["step"] == 6 and module.model.model.layers[0].self_attn.q_proj.weight is attention
    assert fit.lr_scheduler_configs[0].scheduler.last_epoch == 6  # the LR schedule continued
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert any(r.get("weightwise/upcycle_loss_after") for r in rows)


def test_resume_from_a_checkpoint_written_after_upcycling(tmp_path):
    checkpointing = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = DenseLM()
    trainer(max_epochs=1, callbacks=[DenseUpcycling(at_step=2, num_experts=4, method="drop"), checkpointing], enable_checkpointing=True).fit(
        first, loader()
    )
    resumed_cb = DenseUpcycling(at_step=2, num_experts=4, method="drop")
    module = DenseLM()  # dense; the checkpoint holds a Mixtral
    fit = trainer(max_epochs=2, callbacks=[resumed_cb])
    fit.fit(module, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed_cb.done and resumed_cb.report is None  # not upcycled a second time
    assert type(module.model).__name__ == "MixtralForCausalLM" and fit.global_step == 12
    # the optimizer state of the experts came back from the checkpoint (it had trained 4 steps since the surgery)
    assert fit.optimizers[0].state[module.model.model.layers[0].mlp.experts.down_proj]["step"] == 10


def test_refuses_bad_settings_and_modules_without_one_dense_model():
    with pytest.raises(ValueError, match="at_step"):
        DenseUpcycling(at_step=0)
    with pytest.raises(ValueError, match="multiple of granularity"):
        DenseUpcycling(at_step=5, num_experts=5, method="granular")
    with pytest.raises(ValueError, match="'copy', 'granular' or 'drop'"):
        DenseUpcycling(at_step=5, method="noise")

    class TwoModels(DenseLM):
        def __init__(self):
            super().__init__()
            self.reference = DenseLM().model

    with pytest.raises(MisconfigurationException, match="attribute="):
        trainer(max_steps=1, callbacks=[DenseUpcycling(at_step=1)]).fit(TwoModels(), loader())
