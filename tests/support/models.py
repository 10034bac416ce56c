"""Tiny real models and data shared by the tests.

* a linear classifier on separable Gaussian blobs (:class:`Classifier`, :func:`blobs`);
* a 6-layer byte-level Llama on real text - Python's own ``inspect`` source (:class:`TinyLlama`);
* tiny transformers MoE models of each supported family (:func:`tiny_moe`) and a Mixtral language
  model module on the same text (:class:`TinyMoELM`).
"""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from weightwise import IndexedDataset
from weightwise.losses import el2n

N_FEATURES, N_CLASSES = 8, 3


def blobs(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    centers = torch.randn(N_CLASSES, N_FEATURES, generator=gen) * 3
    x = centers[y] + torch.randn(n, N_FEATURES, generator=gen)
    return TensorDataset(x, y)


def indexed_loader(n: int = 64, batch_size: int = 8, shuffle: bool = False, seed: int = 0, sampler=None) -> DataLoader:
    return DataLoader(IndexedDataset(blobs(n, seed)), batch_size=batch_size, shuffle=shuffle, sampler=sampler)


class Classifier(pl.LightningModule):
    """``per_sample=True``: returns the unreduced loss ``[B]`` (weightwise style); else the mean."""

    def __init__(self, per_sample: bool = True, lr: float = 0.1, optimizer: str = "sgd", el2n: bool = False) -> None:
        super().__init__()
        self.per_sample = per_sample
        self.el2n = el2n
        self.lr = lr
        self.optimizer = optimizer
        self.net = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, N_CLASSES))

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self.net(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        if self.el2n:
            return {"loss": losses, "scores": {"el2n": el2n(logits, y)}}
        return losses if self.per_sample else losses.mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def real_bytes(n: int) -> torch.Tensor:
    """``n`` bytes of real text: the source of Python's ``inspect`` module."""
    return torch.tensor(list(inspect.getsource(inspect).encode()[:n]))


def token_batches(n: int = 8, length: int = 16) -> DataLoader:
    data = real_bytes(n * length) % 64
    return DataLoader([{"input_ids": s} for s in data.view(n, length)], batch_size=2)


class TinyLlama(pl.LightningModule):
    def __init__(self, layers: int = 6):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4)
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


MOE_COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def tiny_moe(family: str, num_experts: int = 4, top_k: int = 2, norm_topk_prob: bool = False, seed: int = 0):
    """A tiny, randomly initialised transformers MoE model of ``family`` (in eval mode)."""
    import transformers

    torch.manual_seed(seed)
    if family == "mixtral":
        config = transformers.MixtralConfig(**MOE_COMMON, intermediate_size=16, num_local_experts=num_experts, num_experts_per_tok=top_k)
        model = transformers.MixtralForCausalLM(config)
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **MOE_COMMON,
            intermediate_size=24,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=norm_topk_prob,
            decoder_sparse_step=1,
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **MOE_COMMON, head_dim=8, intermediate_size=24, moe_intermediate_size=16, num_experts=num_experts,
            num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob, decoder_sparse_step=1,
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    elif family == "olmoe":
        config = transformers.OlmoeConfig(
            **MOE_COMMON, intermediate_size=16, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob
        )
        model = transformers.OlmoeForCausalLM(config)
    else:
        raise ValueError(family)
    # Routers are initialised to zeros in some families: give them real routing decisions.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.ndim == 2:
                param.normal_(0, 0.5)
    return model.eval()


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def text_batches(n_batches: int = 6, batch_size: int = 4, length: int = 24) -> list[dict]:
    """Byte-level token ids (mod the tiny vocabulary) from real text."""
    samples = (real_bytes(n_batches * batch_size * length) % 97).view(-1, length)
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


def moe_loader() -> DataLoader:
    return DataLoader(text_batches(), batch_size=4, collate_fn=lambda items: {k: torch.stack([i[k] for i in items]) for k in items[0]})


class TokenLossLM(TinyLlama):
    """TinyLlama returning token losses with their mask (``"tokens"``), the plain HF mean (``"plain"``),
    or the token losses of packed rows with their position ids (``"packed"``: documents restart at
    position 0 every ``document_length`` tokens)."""

    def __init__(self, mode: str = "tokens", layers: int = 2, document_length: int = 5, lr: float = 1e-2):
        super().__init__(layers=layers)
        self.mode, self.document_length, self.lr = mode, document_length, lr

    def training_step(self, batch, batch_idx):
        from weightwise.losses import token_cross_entropy

        labels = batch.get("labels", batch["input_ids"])
        if self.mode == "plain":
            return self.model(input_ids=batch["input_ids"], labels=labels).loss
        logits = self.model(input_ids=batch["input_ids"]).logits
        losses, mask = token_cross_entropy(logits, labels, shift=True)
        if self.mode == "packed":
            positions = torch.arange(labels.shape[1] - 1, device=labels.device) % self.document_length
            return {"loss": losses, "mask": mask, "position_ids": positions.expand_as(losses)}
        return {"loss": losses, "mask": mask}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def padded_token_batches(n: int = 8, length: int = 16, batch_size: int = 2) -> DataLoader:
    """Real-text sequences of different lengths: the tail of every other one is padding (-100 labels)."""
    data = (real_bytes(n * length) % 64).view(n, length)
    items = []
    for i, row in enumerate(data):
        labels = row.clone()
        if i % 2:
            labels[length // 2 + i % 3 :] = -100
        items.append({"input_ids": row, "labels": labels})
    return DataLoader(items, batch_size=batch_size)
