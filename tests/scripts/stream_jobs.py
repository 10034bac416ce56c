"""2-process DDP jobs over a PackedDocumentStream (run by ``tests.scripts.suite``): a straight fit, a
fit that stops after its checkpoint at step 3, and that checkpoint resumed; each rank saves its
parameters and the batches it trained."""

import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.scripts.ddp_jobs import save
from tests.support.streams import StreamLlama, documents
from tests.support.training import flat_params, trainer
from weightwise.data import PackedDocumentStream, StreamLoader, StreamResume


def stream(out_dir: str, max_steps: int, save_every: int | None = None, resume_from: str | None = None) -> None:
    seed_everything(0)
    model = StreamLlama()
    loader = StreamLoader(PackedDocumentStream(documents(), 16, seed=1), batch_size=2)
    callbacks = [StreamResume()]
    if save_every is not None:
        callbacks.append(ModelCheckpoint(out_dir, every_n_train_steps=save_every, filename="{step}"))
    fit = trainer(devices=2, strategy="ddp", max_steps=max_steps, callbacks=callbacks, enable_checkpointing=save_every is not None)
    fit.fit(model, loader, ckpt_path=resume_from)
    save(out_dir, fit.global_rank, {"params": flat_params(model), "seen": torch.stack(model.seen)})
