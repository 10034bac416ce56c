"""Documents of real text and a tiny Llama that records what it trains on, for the stream tests
(``tests/data``, ``tests/scripts/stream_jobs.py``)."""

from __future__ import annotations

import torch

from tests.support.models import TinyLlama, real_bytes


def documents() -> list[torch.Tensor]:
    """40 documents of 5-40 tokens of real text (vocabulary 64, the tiny Llama's)."""
    text, out, offset = real_bytes(4000) % 64, [], 0
    for i in range(40):
        length = 5 + (7 * i) % 36
        out.append(text[offset : offset + length])
        offset += length
    return out


class StreamLlama(TinyLlama):
    """The tiny Llama on packed rows (``position_ids``, ``labels``), recording every batch it trains."""

    def __init__(self):
        super().__init__(layers=2)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False).loss
