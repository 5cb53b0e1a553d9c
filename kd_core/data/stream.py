"""The trainer's reader: token rows and their aligned teacher-cache targets, streamed from shards.

`TrainingStream` is a torch `IterableDataset`. It reads token shards (and, for distillation, the
cache shards aligned with them) from any `Store` (local disk, S3, ...), shard by shard, so a cache
far larger than memory trains the same as a small one. It yields one sample per training row: a
dict of numpy arrays, one per column of the token shard it is asked for (`columns`: `input_ids`
(T,) for language models; for reward models the pair columns of `kd_core/data/preferences.py`
that the model's view reads, so a text teacher never decodes or batches the images), and the
cache's decoded targets (see `kd_core.cache.format.CacheLayout.decode`).

- **Split without overlap.** The consumers are the `world_size` data-parallel ranks times the
  DataLoader workers of each; consumer c of C gets shards c, c+C, c+2C, ... of the epoch's shard
  order when there are at least C shards, and otherwise rows c, c+C, ... of every shard. Either
  way no row goes to two consumers in one epoch, and together they cover every row.
  `split="rows"` trades reading for reproducibility: every rank reads the whole stream and keeps
  every world_size-th row, so the global batches are the same for any number of ranks (1 × 8
  rows = 2 × 4 rows), at world_size times the reading.
- **Order.** Epoch e reads shards in a permutation seeded by (seed, e), and passes rows through a
  shuffle buffer of `shuffle_buffer` rows seeded by (seed, e, c). The stream is endless (epoch
  after epoch) and a pure function of (seed, rank, world size, workers): the same run sees the
  same batches.
- **Prefetch.** `prefetch_shards` threads read, verify and decode the next shards while the
  current one is served.
- **Checks.** Every shard's size and sha256 are checked against its manifest record before use
  (`read_verified`); a missing, truncated or corrupt shard, or a cache shard whose row count does
  not match its token shard, raises `ShardError` naming the shard and what to do.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import count

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kd_core.cache.format import CacheLayout
from kd_core.config import StorageConfig
from kd_core.data.shards import ShardError, decode_arrow, read_verified
from kd_core.storage import FileRecord, Store


class TrainingStream(IterableDataset):
    def __init__(
        self,
        storage: StorageConfig,
        token_shards: list[FileRecord],
        *,
        cache_shards: list[FileRecord] | None = None,
        cache_layout: CacheLayout | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1024,
        prefetch_shards: int = 2,
        epochs: int | None = None,
        split: str = "shards",
        columns: Collection[str] | None = None,
    ):
        if cache_shards and len(cache_shards) != len(token_shards):
            raise ShardError(
                f"the teacher cache has {len(cache_shards)} shards but the training split has {len(token_shards)}; "
                "rerun the cache stage with --force"
            )
        if cache_shards and cache_layout is None:
            raise ValueError("cache_shards need the cache_layout that decodes them")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if split not in ("shards", "rows"):
            raise ValueError(f"split must be 'shards' or 'rows', got {split!r}")
        self.storage, self.token_shards = storage, list(token_shards)
        self.cache_shards, self.cache_layout = list(cache_shards or []), cache_layout
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.prefetch_shards, self.epochs = shuffle_buffer, max(1, prefetch_shards), epochs
        self.split = split
        self.columns = tuple(columns) if columns is not None else None
        """The token-shard columns to read (None: all of them)."""

    # ------------------------------------------------------------------------------ the plan
    def consumer(self) -> tuple[int, int]:
        """(this consumer's index, number of consumers) across ranks and DataLoader workers; with
        `split="rows"` the ranks are not consumers (each reads what all of them would)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        if self.split == "rows":
            return worker, workers
        return self.rank * workers + worker, self.world_size * workers

    def epoch_plan(self, epoch: int, consumer: int, consumers: int) -> list[tuple[int, slice]]:
        """(shard index, row slice) pairs this consumer reads in `epoch`, in order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.token_shards))
        if len(order) >= consumers:
            return [(int(shard), slice(None)) for shard in order[consumer::consumers]]
        return [(int(shard), slice(consumer, None, consumers)) for shard in order]

    # ------------------------------------------------------------------------------ reading
    def read_shard(self, store: Store, index: int, rows: slice) -> dict[str, np.ndarray]:
        """One shard's rows (a slice of them) with their decoded targets, after every check."""
        token_record = self.token_shards[index]
        samples = decode_arrow(read_verified(store, token_record), token_record.url, self.columns)
        shard_rows = len(next(iter(samples.values())))
        if self.cache_shards:
            cache_record = self.cache_shards[index]
            columns = decode_arrow(read_verified(store, cache_record), cache_record.url)
            n_rows = len(next(iter(columns.values())))
            if n_rows != shard_rows:
                raise ShardError(
                    f"cache shard {cache_record.url} holds {n_rows} rows but its token shard {token_record.url} holds "
                    f"{shard_rows}; rerun the cache stage with --force"
                )
            try:
                targets = self.cache_layout.decode({name: values[rows] for name, values in columns.items()})
            except (KeyError, ValueError) as err:
                raise ShardError(f"cache shard {cache_record.url} does not match the cache layout ({err}); rerun the cache stage with --force") from None
        else:
            targets = {}
        # Token ids become int64 (what embeddings take); pixels, labels and targets keep their dtype.
        samples = {name: values[rows].astype(np.int64) if name.endswith("_ids") else values[rows] for name, values in samples.items()}
        return samples | targets

    def _shards(self, store: Store, consumer: int, consumers: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(epoch, shard samples) in plan order; `prefetch_shards` reads run ahead in threads
        (hashing, Arrow and numpy release the GIL, so they overlap with training and each other)."""
        epochs = count() if self.epochs is None else range(self.epochs)
        plan = ((epoch, index, rows) for epoch in epochs for index, rows in self.epoch_plan(epoch, consumer, consumers))
        pool = ThreadPoolExecutor(max_workers=self.prefetch_shards, thread_name_prefix="kdflow-shard-read")
        in_flight: deque = deque()
        try:
            for epoch, index, rows in plan:
                in_flight.append((epoch, pool.submit(self.read_shard, store, index, rows)))
                if len(in_flight) > self.prefetch_shards:
                    epoch_of, future = in_flight.popleft()
                    yield epoch_of, future.result()
            while in_flight:
                epoch_of, future = in_flight.popleft()
                yield epoch_of, future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.split == "shards":
            yield from self._rows()
            return
        # Every rank produces the same sequence and keeps every world_size-th row of it: rank r's
        # batch j holds rows r, r + W, ... of global batch j, whatever W is.
        for index, sample in enumerate(self._rows()):
            if index % self.world_size == self.rank:
                yield sample

    def _rows(self) -> Iterator[dict[str, np.ndarray]]:
        consumer, consumers = self.consumer()
        store = Store(self.storage)
        buffer: list[dict[str, np.ndarray]] = []
        current_epoch, rng = None, None
        for epoch, samples in self._shards(store, consumer, consumers):
            if epoch != current_epoch:  # the buffer drains at each epoch's end: epochs never mix
                if rng is not None:
                    rng.shuffle(buffer)
                    yield from buffer
                    buffer.clear()
                current_epoch, rng = epoch, np.random.default_rng([self.seed, epoch, consumer])
            for row in range(len(next(iter(samples.values())))):
                sample = {name: values[row] for name, values in samples.items()}
                if self.shuffle_buffer <= 1:
                    yield sample
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                slot = int(rng.integers(len(buffer)))
                buffer[slot], sample = sample, buffer[slot]
                yield sample
        if rng is not None:
            rng.shuffle(buffer)
            yield from buffer


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack a list of samples into a batch of tensors."""
    return {name: torch.from_numpy(np.stack([sample[name] for sample in samples])) for name in samples[0]}
