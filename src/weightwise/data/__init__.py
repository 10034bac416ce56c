"""Data that resumes exactly: packed-document streams for language-model pre-training.

* :func:`pack_documents` / :func:`pack_pieces` - documents back to back into rows of ``seq_len``
  tokens, each piece of a document starting at position 0 (the functional core);
* :class:`PackedDocumentStream` - an ``IterableDataset`` of such rows, sharded over ranks and
  DataLoader workers, deterministic given its seed;
* :class:`StreamLoader` - the ``DataLoader`` for it that Lightning checkpoints, and
  :class:`StreamResume`, the callback that tells it which batches trained: a fit resumed mid-run
  continues with exactly the rows that were next;
* :func:`warn_if_streams_restart` - the warning for a stream that has no saved position and starts
  again from its beginning when a fit resumes mid-epoch (every Trainer gets it through
  :class:`StreamRestartWarning`, attached by weightwise's entry point).
"""

from weightwise.data.callback import StreamRestartWarning, StreamResume, warn_if_streams_restart
from weightwise.data.packing import IGNORE_INDEX, as_tokens, pack_documents, pack_pieces
from weightwise.data.stream import PackedDocumentStream, StreamLoader, StreamStart, data_parallel_rank

__all__ = [
    "IGNORE_INDEX",
    "PackedDocumentStream",
    "StreamLoader",
    "StreamRestartWarning",
    "StreamResume",
    "StreamStart",
    "as_tokens",
    "data_parallel_rank",
    "pack_documents",
    "pack_pieces",
    "warn_if_streams_restart",
]
