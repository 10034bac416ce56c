"""2-process DDP (or ZeRO, FSDP2: ``strategy``, see ``sharded_language_jobs``) jobs of domain mixing (CPU,
gloo), run by ``tests.scripts.suite``; each rank saves what it drew and decided.

Every rank draws different data (its own share and generator) with the same weights; the tests
(``tests/mixing/test_distributed.py``) compare the ranks with each other and a resumed run with
the uninterrupted one.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, seed_everything
from torch.utils.data import DataLoader

from tests.scripts.sharded_language_jobs import for_strategy, layout, strategy_for, whole_parameters
from tests.support.models import Classifier, blobs
from tests.support.training import trainer
from weightwise import IndexedDataset
from weightwise.mixing import ODM, DomainMixing, MixingStream, MixtureBatchSampler

N = 96
DOMAINS = (torch.arange(N) % 3 == 0).long()  # 64 of domain 0, 32 of domain 1


class Record(Callback):
    def __init__(self, mixing):
        self.mixing, self.batches, self.weights = mixing, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch.sample_id.tolist() if hasattr(batch, "sample_id") else batch["x"][:, 0].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(self.mixing.weights.clone())


class StreamClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")


def fit(out_dir: str, kind: str = "mapped", steps: int = 8, save_at: int | None = None, resume_from: str | None = None,
        strategy: str = "ddp") -> None:
    seed_everything(0)
    if kind == "mapped":
        source = MixtureBatchSampler(DOMAINS, batch_size=4, names=["big", "small"], num_batches=5)
        loader = DataLoader(IndexedDataset(blobs(N)), batch_sampler=source)
        model = for_strategy(Classifier)(lr=0.5)
    else:
        data = blobs(N)
        rows = lambda d: [{"x": data[i][0], "y": data[i][1]} for i in range(N) if int(DOMAINS[i]) == d]  # noqa: E731
        source = MixingStream({"big": rows(0), "small": rows(1)}, batch_size=4)
        loader = DataLoader(source, batch_size=4)
        model = for_strategy(StreamClassifier)(lr=0.5)
    mixing = DomainMixing(ODM(2, warmup_steps=0), source)
    record = Record(mixing)
    run = trainer(
        devices=2, strategy=strategy_for(strategy), max_steps=save_at or steps, max_epochs=-1, limit_train_batches=5,
        callbacks=[mixing, record], use_distributed_sampler=False,
    )  # fmt: skip
    run.fit(model, loader, ckpt_path=resume_from)
    if save_at:
        run.save_checkpoint(str(Path(out_dir) / "last.ckpt"))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    result = {
        "batches": record.batches, "weights": record.weights, "rewards": mixing.policy.rewards, "ledger": mixing.ledger,
        "params": whole_parameters(model), "layout": layout(model),
    }  # fmt: skip
    torch.save(result, Path(out_dir) / f"rank{run.global_rank}.pt")
