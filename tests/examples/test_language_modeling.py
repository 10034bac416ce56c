"""The streaming LM example: packing, sharding over ranks and workers, and the token-loss output."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from examples.language_modeling import (
    IGNORE_INDEX,
    CausalLM,
    NewsStreamDataModule,
    PackedTextStream,
    pack_documents,
)
from tests.support.training import flat_params, trainer
from weightwise.weighting.reducer import parse_step_output


def test_packing_restarts_positions_at_every_document_and_row():
    rows = list(pack_documents([b"abcdefghij", b"xyz", b"0123456789abc", b"tail"], 8))
    assert [bytes(row["input_ids"].tolist()) for row in rows] == [b"abcdefgh", b"ijxyz012", b"3456789a"]  # "bctail" dropped
    assert rows[1]["position_ids"].tolist() == [0, 1, 0, 1, 2, 0, 1, 2]  # "ij" continues, "xyz" and "012" start
    assert rows[2]["position_ids"].tolist() == list(range(8))  # a continuation starts at 0 in its new row
    assert rows[1]["labels"].tolist() == [IGNORE_INDEX, ord("j"), IGNORE_INDEX, ord("y"), ord("z"), IGNORE_INDEX, ord("1"), ord("2")]


def shard_rows(files: list[Path], rank: int, world_size: int, workers: int) -> list[dict[str, torch.Tensor]]:
    stream = PackedTextStream(files, 4, seed=3, loop=False, rank=rank, world_size=world_size)
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


def test_stream_shards_documents_disjointly_over_ranks_and_workers(tmp_path):
    # 24 documents of 10 bytes, each one letter repeated: a row's letters name its documents.
    files = []
    for i in range(24):
        files.append(tmp_path / f"{i:02d}.txt")
        files[-1].write_bytes(bytes([ord("A") + i]) * 10)
    letters = {}
    for rank in (0, 1):
        for row in shard_rows(files, rank, world_size=2, workers=2):
            starts = row["position_ids"] == 0
            ids = row["input_ids"]
            assert starts[0] and torch.equal(starts[1:], ids[1:] != ids[:-1])  # a new document starts at 0
            letters.setdefault(rank, set()).update(ids.tolist())
    # 4 shards of 6 documents (60 bytes: 15 full rows each, nothing dropped); ranks disjoint, all covered.
    assert len(letters[0]) == len(letters[1]) == 12 and not letters[0] & letters[1]
    assert letters[0] | letters[1] == {ord("A") + i for i in range(24)}
    single = shard_rows(files, 0, world_size=1, workers=0)
    assert {b for row in single for b in row["input_ids"].tolist()} == letters[0] | letters[1]
    with pytest.raises(ValueError, match="cannot feed"):
        next(iter(PackedTextStream(files[:3], 4, rank=0, world_size=4)))


def test_news_validation_articles_are_held_out():
    data = NewsStreamDataModule(val_articles=30)
    data.setup("fit")
    assert len(data.val_files) == 30 and not set(data.val_files) & set(data.train_files)
    assert len(data.train_files) + 30 == 2225
    row = next(iter(data.train_dataloader()))
    assert row["input_ids"].shape == row["position_ids"].shape == row["labels"].shape == (16, 128)


def test_documents_mode_returns_token_losses_that_weightwise_splits_per_document():
    torch.manual_seed(0)
    model = CausalLM(hidden_size=32, num_layers=2, loss_mode="documents").eval()
    batch = {key: torch.stack([row[key] for row in pack_documents([b"abcdefghij", b"xyz", b"0123456789abc"], 8)])
             for key in ("input_ids", "position_ids", "labels")}
    output = model.training_step(batch, 0)
    assert output["loss"].shape == output["mask"].shape == output["position_ids"].shape == (3, 7)
    step = parse_step_output(output)  # how the reducer reads it: one sample per document piece
    assert step.packed and step.tokens.tolist() == [7, 1, 2, 2, 7]
    # Uniform weights by token share are the plain HF mean over the target bytes.
    plain = CausalLM(hidden_size=32, num_layers=2, loss_mode="mean")
    plain.load_state_dict(model.state_dict())
    token_mean = (step.losses * step.tokens).sum() / step.tokens.sum()
    assert torch.allclose(token_mean, plain.eval().training_step(batch, 0), atol=1e-6)
    # Packed attention: "xyz" scores as if it were alone.
    alone = model.model(input_ids=batch["input_ids"][1:2, 2:5], use_cache=False).logits
    assert torch.allclose(model.logits(batch)[1, 2:5], alone[0], atol=1e-5)
    rows = CausalLM(hidden_size=32, num_layers=2, loss_mode="rows").training_step(batch, 0)
    assert set(rows) == {"loss", "mask"} and parse_step_output(rows).losses.shape == (3,)


def test_the_news_stream_resumes_mid_run_exactly(tmp_path):
    """The example's own wiring (files skipped by size, StreamLoader, StreamResume from CausalLM): a fit
    checkpointed at step 3 and resumed ends with the parameters of the uninterrupted fit."""

    def fit(max_steps, save=False, ckpt_path=None):
        pl.seed_everything(0)
        model = CausalLM(hidden_size=32, num_layers=2, loss_mode="mean")
        data = NewsStreamDataModule(seq_len=32, batch_size=4, val_articles=20)
        callbacks = [ModelCheckpoint(tmp_path, every_n_train_steps=3, filename="{step}")] if save else []
        trainer(max_steps=max_steps, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=save).fit(
            model, data, ckpt_path=ckpt_path
        )
        return model

    straight = fit(7)
    fit(3, save=True)
    resumed = fit(7, ckpt_path=tmp_path / "step=3.ckpt")
    assert torch.equal(flat_params(resumed), flat_params(straight))
