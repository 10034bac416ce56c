"""2-process DDP (or ZeRO, FSDP2: ``strategy``, see ``sharded_language_jobs``) jobs over a
PackedDocumentStream (run by ``tests.scripts.suite``): a straight fit, a fit that stops after its checkpoint
at step 3, and that checkpoint resumed; each rank saves its parameters and the batches it trained."""

import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.scripts.ddp_jobs import save
from tests.scripts.sharded_language_jobs import for_strategy, layout, strategy_for, whole_parameters
from tests.support.streams import StreamLlama, documents
from tests.support.training import trainer
from weightwise.data import PackedDocumentStream, StreamLoader, StreamResume


def stream(out_dir: str, max_steps: int, save_every: int | None = None, resume_from: str | None = None, strategy: str = "ddp") -> None:
    seed_everything(0)
    model = for_strategy(StreamLlama)()
    loader = StreamLoader(PackedDocumentStream(documents(), 16, seed=1), batch_size=2)
    callbacks = [StreamResume()]
    if save_every is not None:
        callbacks.append(ModelCheckpoint(out_dir, every_n_train_steps=save_every, filename="{step}"))
    fit = trainer(devices=2, strategy=strategy_for(strategy), max_steps=max_steps, callbacks=callbacks, enable_checkpointing=save_every is not None)
    fit.fit(model, loader, ckpt_path=resume_from)
    save(out_dir, fit.global_rank, {"params": whole_parameters(model), "layout": layout(model), "seen": torch.stack(model.seen)})
