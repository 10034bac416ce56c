"""ExpertUpcycling in real Trainer runs with a tiny Mixtral on real text (Python's own sources)."""

import csv
import inspect

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from tiny_moe import tiny_moe
from torch.utils.data import DataLoader

from weightwise.callbacks import ExpertUpcycling
from weightwise.moe import find_moe_blocks


def text_batches(n_batches: int = 6, batch_size: int = 4, length: int = 24):
    """Byte-level token ids (mod the tiny vocabulary) from a real text: the stdlib's inspect module."""
    data = torch.tensor(list(inspect.getsource(inspect).encode()[: n_batches * batch_size * length])) % 97
    samples = data.view(-1, length)
    return [{"input_ids": s, "labels": s} for s in samples]


class TinyMoELM(pl.LightningModule):
    def __init__(self, top_k: int = 1):
        super().__init__()
        self.model = tiny_moe("mixtral", num_experts=4, top_k=top_k).train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=30)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def loader():
    return DataLoader(text_batches(), batch_size=4, collate_fn=lambda items: {k: torch.stack([i[k] for i in items]) for k in items[0]})


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


def test_refuses_bad_settings():
    with pytest.raises(ValueError, match="at_step"):
        ExpertUpcycling(at_step=0)
