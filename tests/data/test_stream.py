"""PackedDocumentStream and StreamLoader alone: packing, sharding, exact positions, refusals."""

import pytest
import torch

from weightwise.data import PackedDocumentStream, StreamLoader, pack_documents


def letters(n: int = 24, length: int = 10) -> list[bytes]:
    """Document i is one letter repeated: a row's bytes name its documents."""
    return [bytes([ord("A") + i]) * length for i in range(n)]


def rows_of(loader, batches: int | None = None) -> list[torch.Tensor]:
    out = []
    for batch in loader:
        out.append(batch["input_ids"])
        loader.batch_trained()
        if batches is not None and len(out) == batches:
            break
    return out


def test_packing_marks_every_piece_and_its_document():
    rows = list(pack_documents([b"abcdefghij", b"xyz", b"0123456789abc", b"tail"], 8))
    assert [bytes(row["input_ids"].tolist()) for row in rows] == [b"abcdefgh", b"ijxyz012", b"3456789a"]  # "bctail" dropped
    assert rows[1]["position_ids"].tolist() == [0, 1, 0, 1, 2, 0, 1, 2]
    assert rows[1]["document_index"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert rows[1]["labels"].tolist()[:3] == [-100, ord("j"), -100]
    with pytest.raises(ValueError, match="1-D"):
        next(pack_documents([torch.zeros(2, 2)], 4))


def loader_of(loop: bool) -> StreamLoader:
    return StreamLoader(PackedDocumentStream(letters(), 8, seed=3, loop=loop), batch_size=3)


def resumed_from(loader: StreamLoader, loop: bool) -> StreamLoader:
    resumed = loader_of(loop)
    resumed.load_state_dict(loader.state_dict())
    return resumed


def same(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_an_endless_stream_resumed_from_its_state_yields_exactly_the_remaining_batches():
    whole = rows_of(loader_of(True), 25)  # 10 batches an epoch (240 bytes, 30 rows): 2.5 epochs
    first = loader_of(True)
    head = rows_of(first, 7)
    assert same(head + rows_of(resumed_from(first, True), 18), whole)


def test_a_finite_stream_resumes_mid_pass_and_at_the_end_of_a_pass():
    straight = loader_of(False)
    whole = rows_of(straight) + rows_of(straight)  # two passes of 10 batches, each shuffled anew
    assert len(whole) == 20 and not same(whole[:10], whole[10:])
    first = loader_of(False)
    rows_of(first, 7)
    resumed = resumed_from(first, False)
    assert same(rows_of(resumed), whole[7:10]) and same(rows_of(resumed), whole[10:])
    rows_of(first)  # the rest of pass 0: a checkpoint now resumes with pass 1
    assert same(rows_of(resumed_from(first, False)), whole[10:])


def test_ranks_and_workers_partition_the_documents():
    seen = {}
    for rank in (0, 1):
        stream = PackedDocumentStream(letters(), 4, seed=3, loop=False, rank=rank, world_size=2)
        for batch in StreamLoader(stream, batch_size=None, num_workers=2):
            for document in batch["document_index"].unique().tolist():
                seen.setdefault(document, set()).add(rank)
            assert torch.equal(batch["input_ids"] - ord("A"), batch["document_index"])
    assert sorted(seen) == list(range(24)) and all(len(ranks) == 1 for ranks in seen.values())
    assert sum(1 for ranks in seen.values() if ranks == {0}) == 12


class CountingDocuments(list):
    loads = 0

    def __getitem__(self, index):
        CountingDocuments.loads += 1
        return super().__getitem__(index)


def test_lengths_let_a_resume_skip_documents_without_loading_them():
    documents = CountingDocuments(letters())
    stream = PackedDocumentStream(documents, 5, seed=0, lengths=[10] * 24)
    loader = StreamLoader(stream, batch_size=2)
    loader.load_state_dict({**loader.state_dict(), "batches": 30})  # 60 rows = 300 bytes: 30 documents, over 2 epochs
    CountingDocuments.loads = 0
    next(iter(loader))
    assert CountingDocuments.loads == 1  # only the document the next rows come from
    wrong = StreamLoader(PackedDocumentStream(documents, 5, lengths=[9] * 24), batch_size=2)
    with pytest.raises(ValueError, match="lengths says 9"):
        next(iter(wrong))


def test_bad_settings_are_refused_naming_the_fix():
    stream = PackedDocumentStream(letters(), 8)
    state = StreamLoader(stream, batch_size=2).state_dict()
    with pytest.raises(ValueError, match="batch_size=2 \\(now 4\\)"):
        StreamLoader(stream, batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0 \\(now 1\\)"):
        StreamLoader(PackedDocumentStream(letters(), 8, seed=1), batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="persistent_workers=False"):
        StreamLoader(stream, num_workers=1, persistent_workers=True)
    with pytest.raises(TypeError, match="PackedDocumentStream"):
        StreamLoader(letters())
    with pytest.raises(ValueError, match="cannot feed"):
        next(iter(PackedDocumentStream(letters(3), 4, rank=0, world_size=4)))
    loader = StreamLoader(stream, batch_size=2)
    next(iter(loader))
    with pytest.raises(RuntimeError, match="StreamResume"):
        loader.state_dict()  # a batch was handed out, and nobody said whether it trained
    loader.batch_trained()
    with pytest.raises(RuntimeError, match="not handed out"):
        loader.batch_trained()
