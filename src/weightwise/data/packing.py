"""Packing documents into rows of a fixed length: the functional core of :mod:`weightwise.data`.

Pre-training code packs documents back to back into rows of ``seq_len`` tokens, so no token is
padding. Every piece of a document in a row starts at position 0 - its start, or its continuation
at the start of the next row - so HF's packed-sequence attention attends only within a piece, and
weightwise counts each piece as a sample (:func:`weightwise.losses.document_ids_from_positions`,
README "Language models").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label of a token without a target (HF convention): the first token of every piece."""

Document = bytes | bytearray | Sequence[int] | Tensor
"""A document: token ids as a 1-D tensor or sequence of ints, or raw bytes (byte-level, vocabulary 256)."""


def as_tokens(document: Document) -> Tensor:
    """A document's token ids as a 1-D ``int64`` tensor (bytes are their byte values).

    Raises:
        ValueError: the document is not one-dimensional.
    """
    if isinstance(document, (bytes, bytearray)):
        tokens = torch.frombuffer(bytearray(document), dtype=torch.uint8) if document else torch.zeros(0, dtype=torch.uint8)
    else:
        tokens = torch.as_tensor(document)
    if tokens.ndim != 1:
        raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {tuple(tokens.shape)}")
    return tokens.long()


def pack_pieces(pieces: Iterable[tuple[int, Tensor]], seq_len: int) -> Iterator[dict[str, Tensor]]:
    """Rows of exactly ``seq_len`` tokens from ``(document index, token ids)`` pieces, in order.

    Each row has ``input_ids``, ``position_ids`` (restarting at 0 where a piece starts: a document
    that does not fit continues in the next row, from position 0), ``labels`` (``input_ids``, with
    :data:`IGNORE_INDEX` where a piece starts: nothing is predicted across a boundary) and
    ``document_index`` (each token's document, for per-document sample ids). A last, partly filled
    row is dropped.

    Raises:
        ValueError: ``seq_len < 2`` (a row must hold a prediction).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids: list[Tensor] = []
    positions: list[Tensor] = []
    sources: list[Tensor] = []
    filled = 0
    for index, tokens in pieces:
        offset = 0
        while offset < tokens.numel():
            take = min(seq_len - filled, tokens.numel() - offset)
            ids.append(tokens[offset : offset + take])
            positions.append(torch.arange(take))
            sources.append(torch.full((take,), index, dtype=torch.long))
            offset += take
            filled += take
            if filled == seq_len:
                input_ids, position_ids = torch.cat(ids), torch.cat(positions)
                yield {
                    "input_ids": input_ids,
                    "position_ids": position_ids,
                    "labels": input_ids.masked_fill(position_ids == 0, IGNORE_INDEX),
                    "document_index": torch.cat(sources),
                }
                ids, positions, sources, filled = [], [], [], 0


def pack_documents(documents: Iterable[Document], seq_len: int) -> Iterator[dict[str, Tensor]]:
    """Rows of exactly ``seq_len`` tokens filled with ``documents`` in order (:func:`pack_pieces`;
    ``document_index`` counts the documents from 0).

    Example::

        >>> rows = list(pack_documents([b"abcdefghij", b"xyz", b"0123"], 8))
        >>> [bytes(row["input_ids"].tolist()) for row in rows], rows[1]["position_ids"].tolist()
        ([b'abcdefgh', b'ijxyz012'], [0, 1, 0, 1, 2, 0, 1, 2])

    Raises:
        ValueError: ``seq_len < 2``, or a document that is not 1-D.
    """
    return pack_pieces(((index, as_tokens(document)) for index, document in enumerate(documents)), seq_len)
