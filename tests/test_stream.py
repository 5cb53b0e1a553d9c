"""The trainer's streaming reader: no overlap across ranks and workers, seeded order, named errors,
and resuming from a saved position without re-reading the stream before it.

Shards are written directly (token rows numbered so each row says which it is), with cache shards
encoded from random teacher distributions; no model is trained here.
Run: .venv/bin/python -m pytest tests/test_stream.py
"""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kd_core.cache.format import CacheLayout
from kd_core.config import StorageConfig
from kd_core.data.shards import ShardError, encode_arrow
from kd_core.data.stream import StreamPositionError, TrackedBatches, TrainingStream, as_served, collate
from kd_core.storage import Store

SEQ_LEN, VOCAB = 4, 64
LAYOUT = CacheLayout(format="topk", seq_len=SEQ_LEN, vocab_size=VOCAB, slots=5, tail=True)


def write_shards(store: Store, rows_per_shard: list[int]):
    """Token shards whose row r holds the global row number r at every position, and cache shards
    whose teacher puts its top probability on that number (so alignment is checkable)."""
    tokens, caches, first = [], [], 0
    for index, rows in enumerate(rows_per_shard):
        numbers = np.arange(first, first + rows)
        tokens.append(store.write_bytes(f"tokens/{index}.arrow", encode_arrow({"input_ids": np.repeat(numbers[:, None], SEQ_LEN, 1).astype(np.int32)})))
        logits = torch.zeros(rows, SEQ_LEN, VOCAB)
        logits[torch.arange(rows), :, torch.from_numpy(numbers % VOCAB)] = 5.0
        columns = LAYOUT.encode(torch.log_softmax(logits, -1), torch.Generator(), {})
        caches.append(store.write_bytes(f"cache/{index}.arrow", encode_arrow(columns, LAYOUT.schema_metadata())))
        first += rows
    return tokens, caches


def rows_of(samples) -> list[int]:
    return [int(sample["input_ids"][0]) for sample in samples]


@pytest.fixture
def shards(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    return store, *write_shards(store, [10, 7, 12, 9, 11])


def one_epoch(store, tokens, caches, **options):
    return TrainingStream(store.config, tokens, cache_shards=caches, cache_layout=LAYOUT, epochs=1, **options)


def test_samples_carry_their_own_rows_teacher_targets(shards):
    store, tokens, caches = shards
    for sample in one_epoch(store, tokens, caches, shuffle_buffer=8):
        row = int(sample["input_ids"][0])
        assert (sample["input_ids"] == row).all()
        assert (sample["teacher_topk_ids"][:, 0] == row % VOCAB).all()
        assert sample["teacher_topk_logprobs"].shape == (SEQ_LEN, 5) and sample["teacher_entropy"].shape == (SEQ_LEN,)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])  # 8 consumers > 5 shards: rows are strided instead
def test_ranks_split_an_epoch_without_overlap_and_cover_every_row(shards, world_size):
    store, tokens, caches = shards
    seen = [rows_of(one_epoch(store, tokens, caches, rank=rank, world_size=world_size, seed=1)) for rank in range(world_size)]
    flat = [row for part in seen for row in part]
    assert sorted(flat) == list(range(49))
    assert all(part for part in seen)


def test_dataloader_workers_split_a_rank_without_overlap(shards):
    store, tokens, caches = shards
    seen = []
    for rank in range(2):
        stream = one_epoch(store, tokens, caches, rank=rank, world_size=2, shuffle_buffer=4)
        loader = DataLoader(stream, batch_size=3, num_workers=2, collate_fn=collate)
        seen += [int(row) for batch in loader for row in batch["input_ids"][:, 0]]
    assert sorted(seen) == list(range(49))


def test_order_is_seeded_and_shuffled_and_epochs_differ(shards):
    store, tokens, caches = shards
    first = rows_of(one_epoch(store, tokens, caches, seed=5, shuffle_buffer=16))
    assert first == rows_of(one_epoch(store, tokens, caches, seed=5, shuffle_buffer=16))
    assert first != rows_of(one_epoch(store, tokens, caches, seed=6, shuffle_buffer=16))
    unshuffled = rows_of(one_epoch(store, tokens, caches, seed=5, shuffle_buffer=0))
    assert first != unshuffled and sorted(first) == sorted(unshuffled)
    endless = TrainingStream(store.config, tokens, cache_shards=caches, cache_layout=LAYOUT, seed=5, shuffle_buffer=16)
    two_epochs = rows_of(islice(iter(endless), 98))
    assert two_epochs[:49] == first and sorted(two_epochs[49:]) == list(range(49)) and two_epochs[49:] != first


def test_batches_collate_into_tensors(shards):
    store, tokens, caches = shards
    batch = next(iter(DataLoader(one_epoch(store, tokens, caches), batch_size=6, collate_fn=collate)))
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (6, SEQ_LEN)
    assert batch["teacher_topk_ids"].shape == (6, SEQ_LEN, 5) and batch["teacher_topk_logprobs"].dtype == torch.float32


def test_a_corrupt_cache_shard_is_named(shards):
    store, tokens, caches = shards
    data = bytearray(store.read_bytes(caches[2].path))
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(caches[2].path, bytes(data))
    with pytest.raises(ShardError, match=r"cache/2\.arrow is corrupt"):
        list(one_epoch(store, tokens, caches))


def test_a_truncated_or_missing_shard_is_named(shards):
    store, tokens, caches = shards
    store.write_bytes(tokens[1].path, store.read_bytes(tokens[1].path)[:50])
    with pytest.raises(ShardError, match=r"tokens/1\.arrow is truncated"):
        list(one_epoch(store, tokens, caches))
    store.delete(caches[3].path)
    with pytest.raises(ShardError, match=r"cache/3\.arrow is missing"):
        list(one_epoch(store, tokens[:1] + tokens[2:], caches[:1] + caches[2:]))


def test_a_cache_shard_of_another_token_shard_is_refused(shards):
    store, tokens, caches = shards
    swapped = [caches[1], caches[0], *caches[2:]]  # 7 rows against a 10-row token shard
    with pytest.raises(ShardError, match=r"cache shard .*1\.arrow holds 7 rows but its token shard .*0\.arrow holds 10"):
        list(one_epoch(store, tokens, swapped))
    with pytest.raises(ShardError, match="5 shards but the training split has 4"):
        TrainingStream(store.config, tokens[:4], cache_shards=caches, cache_layout=LAYOUT)


def test_streams_from_s3(s3_endpoint, s3_bucket):
    store = Store(StorageConfig(root=f"s3://{s3_bucket}/stream", s3={"endpoint_url": s3_endpoint}))
    tokens, caches = write_shards(store, [6, 5, 4])
    seen = [rows_of(one_epoch(store, tokens, caches, rank=rank, world_size=2)) for rank in range(2)]
    assert sorted(seen[0] + seen[1]) == list(range(15))


def test_row_split_gives_every_world_size_the_same_global_batches(shards):
    store, tokens, caches = shards
    single = rows_of(one_epoch(store, tokens, caches, seed=3, split="rows"))
    for world_size in (2, 4):
        parts = [rows_of(one_epoch(store, tokens, caches, seed=3, split="rows", rank=r, world_size=world_size)) for r in range(world_size)]
        for rank, part in enumerate(parts):
            assert part == single[rank::world_size]
    with pytest.raises(ValueError, match="split must be 'shards' or 'rows'"):
        TrainingStream(store.config, tokens, split="files")


def test_only_the_columns_a_model_reads_are_decoded_and_a_missing_one_is_named(tmp_path):
    """A text reward teacher's stream carries no images, a multimodal student's no text view; a
    shard written for another task (no such column) is named with what it has."""
    from kd_core.tasks import task_named

    store = Store(StorageConfig(root=str(tmp_path)))
    rows = 6
    pair_columns = {
        "chosen_ids": np.full((rows, 3), 1, np.int32), "rejected_ids": np.full((rows, 3), 2, np.int32),
        "text_chosen_ids": np.full((rows, 5), 3, np.int32), "text_rejected_ids": np.full((rows, 5), 4, np.int32),
        "pixels": np.arange(rows * 12, dtype=np.uint8).reshape(rows, 12), "human_label": np.ones((rows, 1), np.float32),
    }
    pairs = [store.write_bytes("pairs/0.arrow", encode_arrow(pair_columns))]
    for role, expected in (("teacher", {"text_chosen_ids", "text_rejected_ids", "human_label"}),
                           ("student", {"chosen_ids", "rejected_ids", "pixels", "human_label"})):
        samples = list(TrainingStream(store.config, pairs, epochs=1, columns=task_named("reward").columns(role, {})))
        assert len(samples) == rows and all(set(sample) == expected for sample in samples), role
        assert all(sample[name].dtype == np.int64 for sample in samples for name in expected if name.endswith("_ids"))
    with pytest.raises(ShardError, match=r"pairs/0.arrow: has no column 'input_ids' \(it has chosen_ids, .*pixels"):
        list(TrainingStream(store.config, pairs, epochs=1, columns=task_named("causal_lm").columns("student", {})))


# ------------------------------------------------------------------------------ resuming
SMALL_SHARDS, SHARD_ROWS, BUFFER, BATCH = 20, 6, 4, 2


def tracked_batches(store, tokens, caches, workers: int, resume: dict | None = None, **options) -> TrackedBatches:
    """A rank's endless batches as the training loop reads them (batches with positions, through a DataLoader)."""
    stream = TrainingStream(
        store.config, tokens, cache_shards=caches, cache_layout=LAYOUT, seed=7, shuffle_buffer=BUFFER, batch_size=BATCH, resume=resume, **options
    )
    return TrackedBatches(iter(DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=as_served)), max(1, workers), resume)


@pytest.mark.parametrize("workers, split", [(0, "shards"), (2, "shards"), (2, "rows")])
def test_a_resumed_stream_reads_back_only_its_buffers_and_serves_the_same_batches(tmp_path, workers, split):
    """Rank 1 of 2 saves its position after N batches (N = 3; 29: mid-drain of an epoch's buffer
    without workers; 121: the fifth epoch) and a new stream resumes from it: the next batches are
    the ones the uninterrupted stream served, every column equal, while it read only the shards
    its buffers reference and the ones its consumers were reading (at most buffer + 1 shards per
    consumer, whatever N). Reaching batch N from the start, as a replay does, reads every row
    before it."""
    store = Store(StorageConfig(root=str(tmp_path)))
    tokens, caches = write_shards(store, [SHARD_ROWS] * SMALL_SHARDS)
    options = {"rank": 1, "world_size": 2, "split": split}
    consumers = max(1, workers)
    refill_bound = consumers * (BUFFER + 1) * SHARD_ROWS
    replay_rows = []
    for served in (3, 29, 121):
        uninterrupted = tracked_batches(store, tokens, caches, workers, **options)
        for _ in range(served):
            next(uninterrupted)
        replay_rows.append(uninterrupted.rows_read())
        saved = json.loads(json.dumps(uninterrupted.state()))  # what a checkpoint holds
        expected = [next(uninterrupted) for _ in range(2 * consumers + 1)]
        resumed = tracked_batches(store, tokens, caches, workers, resume=saved, **options)
        for index, batch in enumerate(expected):
            following = next(resumed)
            assert following.keys() == batch.keys()
            assert all(torch.equal(following[name], batch[name]) for name in batch), (served, index, rows_of(following["input_ids"]))
        assert 0 < resumed.resume_rows_read() <= refill_bound, (served, resumed.resume_rows_read())
        assert replay_rows[-1] >= served * BATCH * (2 if split == "rows" else 1), (served, replay_rows)
    assert replay_rows[-1] > 3 * refill_bound  # at N = 121 a replay reads several times the most a resume can


def test_a_saved_position_that_does_not_fit_the_stream_is_refused(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    tokens, caches = write_shards(store, [SHARD_ROWS] * 4)
    batches = tracked_batches(store, tokens, caches, 0, rank=1, world_size=2)
    next(batches)
    saved = batches.state()
    with pytest.raises(StreamPositionError, match="is consumer 1 of 2, but this run's is 0 of 1"):
        next(tracked_batches(store, tokens, caches, 0, resume=saved))
    read_this_epoch = dict(TrainingStream(store.config, tokens, seed=7).epoch_plan(0, consumer=1, consumers=2))
    saved["positions"]["0"]["buffer"][0][1] = next(shard for shard in range(4) if shard not in read_this_epoch)
    with pytest.raises(StreamPositionError, match="does not fit this data"):
        next(tracked_batches(store, tokens, caches, 0, resume=saved, rank=1, world_size=2))
    with pytest.raises(StreamPositionError, match="format 7, this kdflow reads format 1"):
        tracked_batches(store, tokens, caches, 0, resume=saved | {"format": 7}, rank=1, world_size=2)
