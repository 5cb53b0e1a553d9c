"""Token shards: packed rows of token ids in Arrow IPC files (no pickle anywhere).

A shard is an Arrow IPC file with one column, `input_ids`, of type
`fixed_size_list<int32>[seq_len]`: one packed training row per record. Readers verify the
shard's sha256 against the manifest and name the shard in every error.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Collection

import numpy as np
import pyarrow as pa

from kd_core.errors import InputError
from kd_core.manifest import Manifest
from kd_core.stage import StageRun
from kd_core.storage import FileRecord, Store, with_retries


class ShardError(InputError):
    """A shard that is missing, corrupt or not shaped as its manifest says."""


SPLITS = ("train", "val", "test")
"""The splits prep writes: training, validation (searches, early checks) and the final test."""


def encode_arrow(columns: dict[str, np.ndarray], metadata: dict[bytes, bytes] | None = None) -> bytes:
    """2-D arrays (rows × width) become fixed-size-list columns of one Arrow IPC file, with
    optional schema metadata."""
    arrays, names = [], []
    for name, values in columns.items():
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, values.shape[1]))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names, metadata=metadata)
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def decode_arrow(data: bytes, source: str, columns: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Inverse of `encode_arrow`: each column (or only those named in `columns`) as a 2-D numpy array."""
    try:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid as err:
        raise ShardError(f"{source}: not a readable Arrow IPC file ({err}); delete it and rerun its stage") from None
    missing = [name for name in columns or () if name not in table.column_names]
    if missing:
        raise ShardError(
            f"{source}: has no column {', '.join(map(repr, missing))} (it has {', '.join(table.column_names)}): "
            "it was written for another task or model; rerun the stage that wrote it with --force"
        )
    decoded = {}
    for name in table.column_names if columns is None else columns:
        column = table.column(name).combine_chunks()
        width = column.type.list_size
        decoded[name] = np.array(column.flatten().to_numpy(zero_copy_only=False)).reshape(-1, width)
    return decoded


def read_verified(store: Store, record: FileRecord) -> bytes:
    """The bytes of a manifest-listed file, after checking they are the ones the manifest recorded.
    A transient store error is retried (`storage.with_retries`), and bytes that do not match are
    read once more before the shard is called truncated or corrupt (a reply cut short in transit
    is not a corrupt shard)."""
    for attempt in (1, 2):
        try:
            data = with_retries(lambda: store.read_bytes(record.path), f"reading shard {record.url}")
        except FileNotFoundError:
            raise ShardError(f"shard {record.url} is missing; rerun the stage that wrote it with --force") from None
        if len(data) == record.bytes and hashlib.sha256(data).hexdigest() == record.sha256:
            return data
    if len(data) != record.bytes:
        raise ShardError(
            f"shard {record.url} is truncated or altered: {len(data)} bytes, the manifest says {record.bytes}; "
            "rerun the stage that wrote it with --force"
        )
    raise ShardError(
        f"shard {record.url} is corrupt: its sha256 does not match the manifest; "
        "rerun the stage that wrote it with --force"
    )


def split_shards(prep: Manifest, split: str) -> list[FileRecord]:
    """The token shards of one split, in order."""
    names = prep.details["splits"].get(split, {}).get("shards", [])
    if not names:
        raise ShardError(f"prep {prep.key} has no shards for split {split!r}; add data or lower the held-out fractions")
    return [prep.output(name) for name in names]


def read_columns(store: Store, records: list[FileRecord], max_rows: int | None = None) -> dict[str, np.ndarray]:
    """Every column of `records`, concatenated in order, the first `max_rows` rows of them ({} for
    no records). Reads only as many shards as those rows need."""
    blocks: dict[str, list[np.ndarray]] = {}
    total = 0
    for record in records:
        columns = decode_arrow(read_verified(store, record), record.url)
        for name, values in columns.items():
            blocks.setdefault(name, []).append(values)
        total += len(next(iter(columns.values())))
        if max_rows is not None and total >= max_rows:
            break
    return {name: np.concatenate(parts)[:max_rows] for name, parts in blocks.items()}


def load_split(store: Store, prep: Manifest, split: str, max_rows: int | None = None) -> np.ndarray:
    """All rows of a split as one (rows, seq_len) int64 array (small splits: eval, tests)."""
    return read_columns(store, split_shards(prep, split), max_rows)["input_ids"].astype(np.int64)


def split_documents(documents: list, val_fraction: float, test_fraction: float) -> dict[str, list]:
    """Held-out splits first, at least one document (or conversation) each; the rest trains."""
    n_val = max(1, round(len(documents) * val_fraction))
    n_test = max(1, round(len(documents) * test_fraction))
    return {
        "val": documents[:n_val],
        "test": documents[n_val : n_val + n_test],
        "train": documents[n_val + n_test :],
    }


def write_shards(run: StageRun, split: str, columns: dict[str, np.ndarray], rows_per_shard: int) -> list[str]:
    """`shards/<split>-NNNNN.arrow`, `rows_per_shard` rows of every column each; their names."""
    names = []
    rows = len(next(iter(columns.values())))
    for index, start in enumerate(range(0, rows, rows_per_shard)):
        name = f"shards/{split}-{index:05d}.arrow"
        run.write_bytes(name, encode_arrow({column: values[start : start + rows_per_shard] for column, values in columns.items()}))
        names.append(name)
    return names


def write_split(run: StageRun, split: str, columns: dict[str, np.ndarray], rows_per_shard: int) -> dict:
    """A split of token rows (`input_ids`, and any other column of the same rows) written as shards:
    the manifest's record of it (shard names, rows, tokens)."""
    names = write_shards(run, split, columns, rows_per_shard)
    return {"shards": names, "rows": int(len(columns["input_ids"])), "tokens": int(columns["input_ids"].size)}
