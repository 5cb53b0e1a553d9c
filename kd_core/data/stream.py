"""The trainer's reader: token rows and their aligned teacher-cache targets, streamed from shards.

`TrainingStream` is a torch `IterableDataset`. It reads token shards (and, for distillation, the
cache shards aligned with them) from any `Store` (local disk, S3, ...), shard by shard, so a cache
far larger than memory trains the same as a small one. It yields one sample per training row: a
dict of numpy arrays, one per column of the token shard it is asked for (`columns`: `input_ids`
(T,) for language models; for reward models the pair columns of `kd_core/data/preferences.py`
that the model's view reads, so a text teacher never decodes or batches the images), and the
cache's decoded targets (see `kd_core.cache.format.CacheLayout.decode`). With `batch_size` set it
yields whole collated batches instead, each with the position its consumer stands at after it.

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
- **Position.** A consumer's place in that order is small: the epoch, the entry of the epoch's
  plan it is reading, the rows of that entry taken in, the rows it has served, the shuffle
  generator's state, and the buffered rows as (epoch, shard index, row of the shard) references
  (`ConsumerPosition`, JSON). A batched stream attaches its consumer's position to every batch it
  yields, so the position always describes what the trainer has been served, never what prefetch
  threads or DataLoader workers have read ahead; `TrackedBatches` keeps each worker's latest for
  a checkpoint. A stream built with `resume=` that state continues every consumer where it
  stood: it reads back only the shards its buffer references and the one it was reading, and
  serves exactly the rows that would have come next. DataLoader workers serve batches in turn, so
  a resumed stream rotates them: the worker that serves the first batch continues the consumer
  whose turn was next.
- **Prefetch.** `prefetch_shards` threads read, verify and decode the next shards while the
  current one is served.
- **Checks.** Every shard's size and sha256 are checked against its manifest record before use
  (`read_verified`); a missing, truncated or corrupt shard, or a cache shard whose row count does
  not match its token shard, raises `ShardError` naming the shard and what to do. A saved
  position that does not fit the stream raises `StreamPositionError`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count, islice

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kd_core.cache.format import CacheLayout
from kd_core.config import StorageConfig
from kd_core.data.shards import ShardError, decode_arrow, read_verified
from kd_core.errors import InputError
from kd_core.storage import FileRecord, Store

POSITIONS_FORMAT = 1
"""Version of the JSON that `TrackedBatches.state()` writes and `TrainingStream(resume=...)` reads."""


class StreamPositionError(InputError):
    """A saved stream position that does not fit this stream (other data, consumers or format)."""


@dataclass
class ConsumerPosition:
    """Where one consumer stands in its order after the last row it served. `to_dict` is its JSON
    form: the buffered rows as references, never their data."""

    worker: int
    """The consumer's DataLoader worker in the rank's round-robin (0 without workers)."""
    consumer: int
    consumers: int
    rng: np.random.Generator
    """The shuffle buffer's generator, seeded by (seed, epoch, consumer)."""
    epoch: int = 0
    plan_index: int = 0
    """The entry of the epoch's plan (`TrainingStream.epoch_plan`) being read."""
    row_offset: int = 0
    """Rows of that entry taken in so far (into the buffer, or served)."""
    entry_rows: int | None = None
    """Rows in that entry once it was read, so a finished entry is not read again on resume."""
    draining: bool = False
    """The epoch's entries are done: the buffer, shuffled once, is being served in its order."""
    rows_served: int = 0
    """Rows the consumer's order has produced; with `split="rows"` rank r keeps those whose index
    is r modulo the world size."""
    buffer: list[tuple[tuple[int, int, int], dict[str, np.ndarray]]] = field(default_factory=list)
    """The shuffle buffer: ((epoch, shard index, row of the shard), sample) pairs."""
    shards_read: int = 0
    rows_read: int = 0
    refill_rows: int = 0
    """Shards and (this consumer's) rows read since the iterator started, prefetch included, and
    the rows of them read to refill a restored buffer; reported with each batch, not restored."""
    _reads_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def counted_read(self, rows: int) -> None:
        with self._reads_lock:  # prefetch threads read concurrently
            self.shards_read += 1
            self.rows_read += rows

    def start_epoch(self, epoch: int, seed: int) -> None:
        self.epoch, self.plan_index, self.row_offset, self.entry_rows, self.draining = epoch, 0, 0, None, False
        self.rng = np.random.default_rng([seed, epoch, self.consumer])

    def to_dict(self) -> dict:
        return {
            "worker": self.worker, "consumer": self.consumer, "consumers": self.consumers,
            "epoch": self.epoch, "plan_index": self.plan_index, "row_offset": self.row_offset, "entry_rows": self.entry_rows,
            "draining": self.draining, "rows_served": self.rows_served,
            "buffer": [list(reference) for reference, _ in self.buffer],
            "shuffle_rng": self.rng.bit_generator.state,
            "reads": {"shards": self.shards_read, "rows": self.rows_read, "refill_rows": self.refill_rows},
        }

    @classmethod
    def from_dict(cls, saved: dict, seed: int) -> tuple[ConsumerPosition, list[tuple[int, int, int]]]:
        """The position (its buffer still empty) and the references of the rows to buffer."""
        try:
            position = cls(
                worker=int(saved["worker"]), consumer=int(saved["consumer"]), consumers=int(saved["consumers"]),
                rng=np.random.default_rng([seed, int(saved["epoch"]), int(saved["consumer"])]),
                epoch=int(saved["epoch"]), plan_index=int(saved["plan_index"]), row_offset=int(saved["row_offset"]),
                entry_rows=None if saved["entry_rows"] is None else int(saved["entry_rows"]),
                draining=bool(saved["draining"]), rows_served=int(saved["rows_served"]),
            )
            position.rng.bit_generator.state = saved["shuffle_rng"]
            references = [(int(epoch), int(shard), int(row)) for epoch, shard, row in saved["buffer"]]
        except (KeyError, TypeError, ValueError) as err:
            raise StreamPositionError(
                f"the saved stream position of data worker {saved.get('worker', '?')} is malformed ({type(err).__name__}: {err}); "
                "start the run over (distill.resume=never)"
            ) from None
        return position, references


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
        batch_size: int | None = None,
        resume: dict | None = None,
        more_caches: dict[str, tuple[list[FileRecord], CacheLayout]] | None = None,
    ):
        for name, (shards, _) in {"": (cache_shards, cache_layout), **(more_caches or {})}.items():
            if shards and len(shards) != len(token_shards):
                raise ShardError(
                    f"the teacher cache{f' of teachers.{name}' if name else ''} has {len(shards)} shards but the training split has "
                    f"{len(token_shards)}; rerun the cache stage with --force"
                )
        if cache_shards and cache_layout is None:
            raise ValueError("cache_shards need the cache_layout that decodes them")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if split not in ("shards", "rows"):
            raise ValueError(f"split must be 'shards' or 'rows', got {split!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 row, got {batch_size}")
        if resume is not None and resume.get("format") != POSITIONS_FORMAT:
            raise StreamPositionError(
                f"saved stream positions of format {resume.get('format')!r}, this kdflow reads format {POSITIONS_FORMAT}; "
                "start the run over (distill.resume=never)"
            )
        if resume is not None and not (isinstance(resume.get("positions"), dict) and isinstance(resume.get("batches"), int)):
            raise StreamPositionError(
                "saved stream positions without their 'positions' or 'batches'; start the run over (distill.resume=never)"
            )
        self.storage, self.token_shards = storage, list(token_shards)
        self.cache_shards, self.cache_layout = list(cache_shards or []), cache_layout
        self.more_caches = dict(more_caches or {})
        """Other teachers' caches (`teachers:`), by name: their targets come under `<name>:` keys."""
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.prefetch_shards, self.epochs = shuffle_buffer, max(1, prefetch_shards), epochs
        self.split = split
        self.columns = tuple(columns) if columns is not None else None
        """The token-shard columns to read (None: all of them)."""
        self.batch_size = batch_size
        """None yields samples; n yields (batch of n collated rows, the consumer's position dict)."""
        self.resume = resume
        """The rank's saved positions (`TrackedBatches.state()`): each consumer continues there."""

    # ------------------------------------------------------------------------------ the plan
    def worker(self) -> tuple[int, int]:
        """(this DataLoader worker's turn in the rank's round-robin, number of workers). A resumed
        stream rotates the turns, so its first batch comes from the consumer whose turn was next."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        served = self.resume["batches"] if self.resume else 0
        return (worker + served) % workers, workers

    def consumer(self) -> tuple[int, int]:
        """(this consumer's index, number of consumers) across ranks and DataLoader workers; with
        `split="rows"` the ranks are not consumers (each reads what all of them would)."""
        worker, workers = self.worker()
        if self.split == "rows":
            return worker, workers
        return self.rank * workers + worker, self.world_size * workers

    def epoch_plan(self, epoch: int, consumer: int, consumers: int) -> list[tuple[int, slice]]:
        """(shard index, row slice) pairs this consumer reads in `epoch`, in order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.token_shards))
        if len(order) >= consumers:
            return [(int(shard), slice(None)) for shard in order[consumer::consumers]]
        return [(int(shard), slice(consumer, None, consumers)) for shard in order]

    def start_position(self) -> tuple[ConsumerPosition, list[tuple[int, int, int]]]:
        """This consumer's position to start from (the saved one when resuming) and the references
        of the rows its buffer held."""
        worker, workers = self.worker()
        consumer, consumers = self.consumer()
        saved = (self.resume or {}).get("positions", {}).get(str(worker))
        if saved is None:  # a fresh run, or a worker that had served nothing yet
            return ConsumerPosition(worker, consumer, consumers, rng=np.random.default_rng([self.seed, 0, consumer])), []
        position, references = ConsumerPosition.from_dict(saved, self.seed)
        if (position.consumer, position.consumers) != (consumer, consumers):
            raise StreamPositionError(
                f"the saved stream position of data worker {worker} is consumer {position.consumer} of {position.consumers}, "
                f"but this run's is {consumer} of {consumers} (other ranks, data workers or data split); "
                "resume with the settings it was written with, or start over (distill.resume=never)"
            )
        return position, references

    # ------------------------------------------------------------------------------ reading
    def read_shard(self, store: Store, index: int, rows: slice) -> dict[str, np.ndarray]:
        """One shard's rows (a slice of them) with their decoded targets, after every check."""
        token_record = self.token_shards[index]
        samples = decode_arrow(read_verified(store, token_record), token_record.url, self.columns)
        shard_rows = len(next(iter(samples.values())))
        targets = {}
        caches = [("", self.cache_shards, self.cache_layout)] if self.cache_shards else []
        caches += [(f"{name}:", shards, layout) for name, (shards, layout) in self.more_caches.items()]
        for prefix, shards, layout in caches:
            cache_record = shards[index]
            columns = decode_arrow(read_verified(store, cache_record), cache_record.url)
            n_rows = len(next(iter(columns.values())))
            if n_rows != shard_rows:
                raise ShardError(
                    f"cache shard {cache_record.url} holds {n_rows} rows but its token shard {token_record.url} holds "
                    f"{shard_rows}; rerun the cache stage with --force"
                )
            try:
                decoded = layout.decode({name: values[rows] for name, values in columns.items()})
            except (KeyError, ValueError) as err:
                raise ShardError(f"cache shard {cache_record.url} does not match the cache layout ({err}); rerun the cache stage with --force") from None
            targets |= {prefix + name: values for name, values in decoded.items()}
        # Token ids become int64 (what embeddings take); pixels, labels and targets keep their dtype.
        samples = {name: values[rows].astype(np.int64) if name.endswith("_ids") else values[rows] for name, values in samples.items()}
        return samples | targets

    def _counted_read(self, position: ConsumerPosition, store: Store, index: int, rows: slice) -> dict[str, np.ndarray]:
        samples = self.read_shard(store, index, rows)
        position.counted_read(_row_count(samples))
        return samples

    def _entries(
        self, store: Store, position: ConsumerPosition, first: dict[str, np.ndarray] | None
    ) -> Iterator[tuple[int, int, int, slice, dict[str, np.ndarray]]]:
        """(epoch, plan index, shard, row slice, samples) from the position's entry on, in plan
        order (`first`: that entry's samples, when already read); `prefetch_shards` reads run ahead
        in threads (hashing, Arrow and numpy release the GIL, so they overlap with training and
        each other)."""
        start = (position.epoch, position.plan_index)
        epochs = count(position.epoch) if self.epochs is None else range(position.epoch, self.epochs)
        plan = (
            (epoch, index, shard, rows)
            for epoch in epochs
            for index, (shard, rows) in enumerate(self.epoch_plan(epoch, position.consumer, position.consumers))
            if (epoch, index) >= start
        )
        pool = ThreadPoolExecutor(max_workers=self.prefetch_shards, thread_name_prefix="kdflow-shard-read")
        in_flight: deque = deque()
        try:
            for epoch, index, shard, rows in plan:
                if first is not None and (epoch, index) == start:
                    future = Future()
                    future.set_result(first)
                else:
                    future = pool.submit(self._counted_read, position, store, shard, rows)
                in_flight.append(((epoch, index, shard, rows), future))
                if len(in_flight) > self.prefetch_shards:
                    entry, future = in_flight.popleft()
                    yield *entry, future.result()
            while in_flight:
                entry, future = in_flight.popleft()
                yield *entry, future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _refill(self, store: Store, position: ConsumerPosition, references: list[tuple[int, int, int]]) -> dict[str, np.ndarray] | None:
        """Put a restored position's buffered rows back, reading only the shards they reference and
        the entry being read; returns that entry's samples (None when it need not be read here)."""
        plan = self.epoch_plan(position.epoch, position.consumer, position.consumers)
        rows_of_shard = dict(plan)  # an epoch's plan holds each shard at most once
        current = plan[position.plan_index][0] if position.plan_index < len(plan) else None
        wanted = {shard for _, shard, _ in references} | ({current} if current is not None and position.row_offset > 0 else set())
        strangers = [reference for reference in references if reference[0] != position.epoch or reference[1] not in rows_of_shard]
        if strangers or not 0 <= position.plan_index <= len(plan):
            raise StreamPositionError(
                f"the saved stream position of data worker {position.worker} does not fit this data "
                f"(epoch {position.epoch}, plan entry {position.plan_index} of {len(plan)}, buffered row {strangers[:1]}); "
                "resume with the data it was written for, or start over (distill.resume=never)"
            )
        with ThreadPoolExecutor(max_workers=self.prefetch_shards, thread_name_prefix="kdflow-shard-refill") as pool:
            read = dict(zip(wanted, pool.map(lambda shard: self._counted_read(position, store, shard, rows_of_shard[shard]), wanted)))
        position.refill_rows = sum(_row_count(samples) for samples in read.values())
        position.buffer = [
            (reference, _sample_at(read[reference[1]], rows_of_shard[reference[1]], reference, position.worker)) for reference in references
        ]
        return read.get(current)

    # ------------------------------------------------------------------------------ serving
    def __iter__(self) -> Iterator[dict[str, np.ndarray]] | Iterator[tuple[dict[str, torch.Tensor], dict]]:
        position, references = self.start_position()
        rows = self._rows(Store(self.storage), position, references)
        if self.batch_size is None:
            yield from rows
            return
        while samples := list(islice(rows, self.batch_size)):
            yield collate(samples), position.to_dict()

    def _rows(self, store: Store, position: ConsumerPosition, references: list[tuple[int, int, int]]) -> Iterator[dict[str, np.ndarray]]:
        """This rank's rows of the consumer's order from `position` on, advancing it before each
        row is served (so a position taken after a row describes exactly what was served)."""
        if position.entry_rows is not None and position.row_offset >= position.entry_rows:
            position.plan_index, position.row_offset, position.entry_rows = position.plan_index + 1, 0, None
        first = self._refill(store, position, references)
        for epoch, index, shard, rows, samples in self._entries(store, position, first):
            if epoch != position.epoch:  # the buffer drains at each epoch's end: epochs never mix
                yield from self._drain(position)
                position.start_epoch(epoch, self.seed)
            if index != position.plan_index:
                position.plan_index, position.row_offset = index, 0
            position.entry_rows = _row_count(samples)
            for offset in range(position.row_offset, position.entry_rows):
                position.row_offset = offset + 1
                entry = ((epoch, shard, _row_of_shard(rows, offset)), {name: values[offset] for name, values in samples.items()})
                if self.shuffle_buffer > 1:
                    if len(position.buffer) < self.shuffle_buffer:
                        position.buffer.append(entry)
                        continue
                    slot = int(position.rng.integers(len(position.buffer)))
                    position.buffer[slot], entry = entry, position.buffer[slot]
                if self._serves(position):
                    yield entry[1]
        yield from self._drain(position)

    def _drain(self, position: ConsumerPosition) -> Iterator[dict[str, np.ndarray]]:
        """Serve the buffer at the end of the position's epoch, shuffled once (a resumed drain
        continues in the order it had)."""
        if not position.draining:
            position.rng.shuffle(position.buffer)
            position.draining, position.row_offset, position.entry_rows = True, 0, None
            position.plan_index = len(self.epoch_plan(position.epoch, position.consumer, position.consumers))
        while position.buffer:
            _, sample = position.buffer.pop(0)
            if self._serves(position):
                yield sample

    def _serves(self, position: ConsumerPosition) -> bool:
        """Whether the row the consumer's order produces next is this rank's (always, unless
        `split="rows"`: every rank produces the same order and keeps every world_size-th row, so
        rank r's batch j holds rows r, r + W, ... of global batch j, whatever W is)."""
        index = position.rows_served
        position.rows_served += 1
        return self.split == "shards" or index % self.world_size == self.rank


class TrackedBatches:
    """A rank's batches from a batched `TrainingStream` behind a DataLoader (`as_served`): iterates
    the batches and keeps the latest position of each worker's consumer; `state()` is what a
    checkpoint stores and what `TrainingStream(resume=...)` continues from."""

    def __init__(self, loader_iterator: Iterator, workers: int, resume: dict | None = None):
        self.iterator, self.workers = loader_iterator, workers
        self.batches = resume["batches"] if resume else 0
        """Batches served since the run began (resumed runs included): whose turn is next."""
        self.positions: dict[str, dict] = dict(resume["positions"]) if resume else {}
        self.served_here: set[str] = set()
        """The workers that have served a batch to this iterator (the others' positions are restored ones)."""
        self.replayed_rows = 0

    def __iter__(self) -> TrackedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch, position = next(self.iterator)
        self.positions[str(position["worker"])] = position
        self.served_here.add(str(position["worker"]))
        self.batches += 1
        return batch

    def replay(self, batches: int) -> None:
        """Read and drop `batches` batches: how a run resumes from a checkpoint without positions."""
        for _ in range(batches):
            next(self)
        self.replayed_rows = self.rows_read()

    def state(self) -> dict:
        return {"format": POSITIONS_FORMAT, "workers": self.workers, "batches": self.batches, "positions": dict(self.positions)}

    def rows_read(self) -> int:
        """Rows the workers' streams read since this iterator started (prefetch included), as of
        each worker's latest batch."""
        return sum(self.positions[worker]["reads"]["rows"] for worker in self.served_here)

    def resume_rows_read(self) -> int:
        """Rows read to bring the stream to where the run resumed: a replay's, or the refills of
        the buffers and current shards of the workers that have served since."""
        return self.replayed_rows + sum(self.positions[worker]["reads"]["refill_rows"] for worker in self.served_here)


def as_served(item):
    """The DataLoader `collate_fn` (with `batch_size=None`) of a batched stream, whose items are
    batches already."""
    return item


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack a list of samples into a batch of tensors."""
    return {name: torch.from_numpy(np.stack([sample[name] for sample in samples])) for name in samples[0]}


def _row_count(samples: dict[str, np.ndarray]) -> int:
    return len(next(iter(samples.values())))


def _row_of_shard(rows: slice, offset: int) -> int:
    """The shard's row number of the `offset`-th row of its slice `rows`."""
    return (rows.start or 0) + offset * (rows.step or 1)


def _sample_at(samples: dict[str, np.ndarray], rows: slice, reference: tuple[int, int, int], worker: int) -> dict[str, np.ndarray]:
    """The buffered row `reference` out of its shard's samples (read with the slice `rows`)."""
    offset, misaligned = divmod(reference[2] - (rows.start or 0), rows.step or 1)
    if misaligned or not 0 <= offset < _row_count(samples):
        raise StreamPositionError(
            f"the saved stream position of data worker {worker} buffers row {reference[2]} of shard {reference[1]}, "
            "which this consumer does not read there; resume with the data it was written for, or start over (distill.resume=never)"
        )
    return {name: values[offset] for name, values in samples.items()}
