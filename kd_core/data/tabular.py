"""Prep of a tabular task (`task: tabular`): a table -> numeric, categorical and target shards.

The table is CSV or Parquet files (`data.source: table`, `data.files`; their rows concatenated in
file order) or a dataset bundled with scikit-learn (`data.source: sklearn`); `data.table` names the
target and the feature columns. In order:

1. Read. CSV cells are read as text; `NULL_VALUES` are missing. A numeric column is parsed as
   float64; a categorical or classification-target column is read as text.
2. Bad rows: a missing target, a regression target or numeric cell that is not a finite number.
   `bad_rows: error` stops at the first, naming the file, the row and the column; `drop` drops and
   counts them. A missing numeric value with `missing: error` stops the same way.
3. Split: a seeded shuffle, stratified by class for classification (every class keeps at least one
   training row), into `val_fraction`, `test_fraction` and the rest for training.
4. Encode with the training split's statistics: each numeric column's mean and standard deviation
   (a missing value becomes the mean: `imputed` counts them); each categorical column's vocabulary
   (`UNKNOWN`, `MISSING`, then its training values sorted): a value the training split lacks is
   read as `UNKNOWN` (`unseen` counts them per split); the classes (sorted; numbers numerically);
   a regression target's mean and standard deviation.
5. Write shards of `numeric` (rows, F_num) float32, `categorical` (rows, F_cat) int32 (each present
   only when its width is above 0) and `target` (rows, 1): a class index (int32) or the value
   (float32). The training rows are shuffled (seeded) before sharding.

The manifest's `details["table"]` (`TableSchema.to_dict`) is everything a model needs to read a raw
row: the columns in order, the vocabularies, the statistics, the classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd_core.config import SKLEARN_DATASETS, DataConfig
from kd_core.data.shards import write_shards
from kd_core.data.sources import DataSourceError, FileSource
from kd_core.progress import progress_bar
from kd_core.stage import StageRun
from kd_core.storage import Store

UNKNOWN = "<unknown>"
"""Category code 0: a value the training split does not hold."""
MISSING = "<missing>"
"""Category code 1: a missing value."""
NULL_VALUES = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?"]
"""CSV cells read as missing."""
NO_LABEL = -1
"""The class index of a row without a label (a synthetic row the teacher labels)."""


class TableError(DataSourceError):
    """A table that cannot be prepared as configured; names the file, row and column."""


@dataclass
class TableSchema:
    """What a model needs to read a raw row: the columns, vocabularies, statistics and classes."""

    kind: str
    target: str
    numeric: list[str]
    categorical: list[str]
    numeric_mean: list[float]
    numeric_std: list[float]
    categories: dict[str, list[str]]
    classes: list[str] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def outputs(self) -> int:
        """Width of a model's output: one logit per class, or one value."""
        return len(self.classes) if self.kind == "classification" else 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Table:
    """Columns as read: numeric ones float64 (NaN missing), the others object arrays of text (None
    missing); `origins[i]` says where row i came from (for errors)."""

    columns: dict[str, np.ndarray]
    origins: list[str]
    sources: int = 1
    dropped: dict[str, int] = field(default_factory=dict)
    texts: dict[str, list] = field(default_factory=dict)
    """The cells as read, of numeric columns read from text (to quote a cell that is not a number)."""


# ------------------------------------------------------------------------------------------ read
def resolved_columns(data: DataConfig, available: list[str]) -> tuple[str, list[str], list[str]]:
    """(kind, numeric, categorical) of `data.table`, checked against the table's columns."""
    table = data.table
    kind = table.kind or (SKLEARN_DATASETS[table.dataset] if data.source == "sklearn" and table.dataset else None)
    if kind is None:
        raise TableError("data.table.kind: say whether the target is a class (classification) or a number (regression)")
    numeric = table.numeric
    if numeric is None:
        if data.source == "table":
            raise TableError(f"data.table.numeric: name the numeric feature columns; the table has {', '.join(available)}")
        numeric = [name for name in available if name != table.target and name not in table.categorical]
    missing = [name for name in [table.target, *numeric, *table.categorical] if name not in available]
    if missing:
        raise TableError(f"data.table: no column {', '.join(map(repr, missing))} in the table; it has {', '.join(available)}")
    if not numeric and not table.categorical:
        raise TableError("data.table: no feature column; name them in numeric and categorical")
    return kind, list(numeric), list(table.categorical)


def read_table(data: DataConfig, source: FileSource | None) -> tuple[Table, str, list[str], list[str]]:
    """The table with every configured column in its reading type, and (kind, numeric, categorical)."""
    if data.source == "sklearn":
        return _bundled(data)
    pieces, origins = [], []
    with progress_bar("prep: read tables", total=len(source.files)) as bar:
        for file in source.files:
            table = _read_file(file)
            pieces.append(table)
            csv_file = ".csv" in file.path.rsplit("/", 1)[-1]
            # a CSV's line number (its header is line 1), a Parquet file's row number (from 1)
            origins += [f"{file.url} line {row + 2}" if csv_file else f"{file.url} row {row + 1}" for row in range(table.num_rows)]
            bar.advance()
    available = list(pieces[0].column_names)
    for file, piece in zip(source.files, pieces):
        absent = [name for name in available if name not in piece.column_names]
        if absent:
            raise TableError(f"data.files: {file.url} lacks column(s) {', '.join(map(repr, absent))} that {source.files[0].url} has")
    kind, numeric, categorical = resolved_columns(data, available)
    columns, texts = {}, {}
    for name in [data.table.target, *numeric, *categorical]:
        chunks = pa.chunked_array([piece.column(name).combine_chunks() for piece in pieces])
        as_number = name in numeric or (name == data.table.target and kind == "regression")
        columns[name] = _numbers(chunks) if as_number else _texts(chunks)
        if as_number and not _is_number_type(chunks.type):
            texts[name] = pc.cast(chunks, pa.string()).to_pylist()
    return Table(columns, origins, sources=len(pieces), texts=texts), kind, numeric, categorical


def _is_number_type(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def _read_file(file) -> pa.Table:
    import pyarrow.csv as csv
    import pyarrow.parquet as pq

    try:
        with file.fs.open(file.path, "rb", compression="infer") as handle:
            if ".csv" in file.path.rsplit("/", 1)[-1]:
                # every column as text: numbers are parsed here, where a bad cell can be named
                header = csv.open_csv(handle).schema.names  # reads the first block only
                handle.seek(0)
                options = csv.ConvertOptions(null_values=NULL_VALUES, strings_can_be_null=True, column_types={name: pa.string() for name in header})
                return csv.read_csv(handle, convert_options=options)
            return pq.read_table(handle)
    except (pa.ArrowInvalid, OSError) as err:
        raise TableError(f"data.files: {file.url}: not a readable table ({str(err).splitlines()[0]})") from None


def _numbers(values: pa.ChunkedArray) -> np.ndarray:
    """float64 with NaN for missing; a cell that is not a number becomes +inf here (flagged bad later)."""
    if _is_number_type(values.type):
        numbers = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
        return np.where(np.isfinite(numbers) | np.isnan(numbers), numbers, np.inf)
    texts = pc.cast(values, pa.string()).to_pylist()
    out = np.full(len(texts), np.nan)
    for row, text in enumerate(texts):
        if text is None or text.strip() in NULL_VALUES:
            continue
        try:
            out[row] = float(text)
        except ValueError:
            out[row] = np.inf
    return np.where(np.isfinite(out) | np.isnan(out), out, np.inf)


def _texts(values: pa.ChunkedArray) -> np.ndarray:
    texts = pc.cast(values, pa.string()).to_pylist()
    return np.array([None if text is None or text.strip() in NULL_VALUES else text.strip() for text in texts], dtype=object)


def _bundled(data: DataConfig) -> tuple[Table, str, list[str], list[str]]:
    import sklearn.datasets

    if data.table.dataset is None:
        raise TableError(f"data.table.dataset: name the bundled dataset ({', '.join(SKLEARN_DATASETS)})")
    bunch = getattr(sklearn.datasets, f"load_{data.table.dataset}")()
    names = [str(name) for name in bunch.feature_names]
    target = np.asarray(bunch.target)
    available = [*names, "target"]
    if data.table.target != "target":
        raise TableError(f"data.table.target: the bundled {data.table.dataset}'s target is 'target', got {data.table.target!r}")
    kind, numeric, categorical = resolved_columns(data, available)
    columns = {"target": target.astype(float) if kind == "regression" else np.array(
        [str(bunch.target_names[label]) if hasattr(bunch, "target_names") else str(label) for label in target], dtype=object)}
    for index, name in enumerate(names):
        values = bunch.data[:, index]
        if name in categorical:
            columns[name] = np.array([f"{value:g}" for value in values], dtype=object)
        elif name in numeric:
            columns[name] = values.astype(np.float64)
    origins = [f"{data.table.dataset} row {row}" for row in range(len(target))]
    return Table(columns, origins), kind, numeric, categorical


# -------------------------------------------------------------------------------------- bad rows
def drop_bad_rows(table: Table, data: DataConfig, kind: str, numeric: list[str]) -> Table:
    """Rows with a missing target or a cell that is not a finite number: an error naming the first,
    or dropped and counted by cause (`bad_rows`). A missing numeric value with `missing: error` too."""
    settings = data.table
    target = table.columns[settings.target]
    bad = np.zeros(len(table.origins), bool)
    causes = {}
    checks = [(settings.target, _missing(target), "has no target value", "drop it or fill it in")]
    if kind == "regression":
        checks.append((settings.target, np.isinf(target), "holds a target that is not a finite number", "fix the cell"))
    for name in numeric:
        values = table.columns[name]
        checks.append((name, np.isinf(values), "holds a value that is not a finite number", "fix the cell"))
        if settings.missing == "error":
            checks.append((name, np.isnan(values), "is missing", "fill it in, or set data.table.missing: impute (the training mean)"))
    for name, flagged, problem, fix in checks:
        if not flagged.any():
            continue
        row = int(np.flatnonzero(flagged)[0])
        if problem.endswith("not a finite number") and flagged.mean() > 0.5:  # a text column named as a number
            role = "the target: set data.table.kind: classification" if name == settings.target else "list it under data.table.categorical"
            raise TableError(
                f"data: column {name!r} is mostly not numbers ({int(flagged.sum()):,} of {len(flagged):,} cells, e.g. "
                f"{table.texts.get(name, ['?'] * (row + 1))[row]!r} at {table.origins[row]}); if it holds categories, it is {role}"
            )
        if settings.bad_rows == "error" or (problem == "is missing"):
            more = f" ({int(flagged.sum()) - 1} more rows like it)" if flagged.sum() > 1 else ""
            advice = fix if problem == "is missing" else f"{fix}, or set data.table.bad_rows: drop"
            cell = f" ({table.texts[name][row]!r})" if name in table.texts and problem.endswith("not a finite number") else ""
            raise TableError(f"data: {table.origins[row]}: column {name!r} {problem}{cell}{more}; {advice}")
        causes[f"{name}: {problem}"] = int((flagged & ~bad).sum())
        bad |= flagged
    keep = ~bad
    kept = [origin for origin, kept in zip(table.origins, keep) if kept]
    if len(kept) < 3:
        raise TableError(f"data: {len(kept)} of {len(keep):,} rows are usable ({'; '.join(f'{k}: {v:,}' for k, v in causes.items())}); "
                         "check data.table's columns and kinds")
    return Table({name: values[keep] for name, values in table.columns.items()}, kept, table.sources, causes)


def _missing(values: np.ndarray) -> np.ndarray:
    if values.dtype == object:
        return np.array([value is None for value in values], bool)
    return np.isnan(values)


# ----------------------------------------------------------------------------------------- split
def split_rows(labels: np.ndarray | None, rows: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Row indices of each split: a seeded shuffle, stratified by `labels` when given (each class
    gives its share to val and test, keeping at least one training row)."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(rows)] if labels is None else [np.flatnonzero(labels == label) for label in np.unique(labels)]
    parts = {"train": [], "val": [], "test": []}
    for group in groups:
        group = rng.permutation(group)
        n_val = min(round(len(group) * val_fraction), max(len(group) - 1, 0))
        n_test = min(round(len(group) * test_fraction), max(len(group) - 1 - n_val, 0))
        parts["val"].append(group[:n_val])
        parts["test"].append(group[n_val : n_val + n_test])
        parts["train"].append(group[n_val + n_test :])
    split = {name: rng.permutation(np.concatenate(chunks)) for name, chunks in parts.items()}
    for name in ("val", "test"):
        if len(split[name]) == 0:  # too few rows of any class for a share: take a training row whose class keeps another
            train = split["train"]
            spare = [i for i, row in enumerate(train) if labels is None or (labels[train] == labels[row]).sum() > 1]
            if not spare:
                raise TableError(f"data: {rows} usable rows are too few for a training, validation and test split")
            split[name], split["train"] = train[spare[:1]], np.delete(train, spare[0])
    return split


# ---------------------------------------------------------------------------------------- encode
def class_order(labels: np.ndarray) -> list[str]:
    """The distinct labels sorted: numerically when every one is a number, else as text."""
    distinct = sorted(set(labels.tolist()))
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return distinct


def fit_schema(table: Table, train: np.ndarray, kind: str, target: str, numeric: list[str], categorical: list[str]) -> TableSchema:
    """The training split's statistics, vocabularies and classes."""
    means, stds = [], []
    for name in numeric:
        values = table.columns[name][train]
        present = values[~np.isnan(values)]
        if len(present) == 0:
            raise TableError(f"data.table.numeric: column {name!r} has no value in the training split; drop it from the features")
        means.append(float(present.mean()))
        std = float(present.std())
        stds.append(std if std > 0 else 1.0)
    categories = {}
    for name in categorical:
        seen = {value for value in table.columns[name][train] if value is not None}
        categories[name] = [UNKNOWN, MISSING, *sorted(seen)]
    schema = TableSchema(kind, target, numeric, categorical, means, stds, categories)
    if kind == "classification":
        schema.classes = class_order(table.columns[target])
        if len(schema.classes) < 2:
            raise TableError(f"data.table.target: column {target!r} holds one class ({schema.classes[0]!r}); a classifier needs at least two")
    else:
        values = table.columns[target][train]
        schema.target_mean, schema.target_std = float(values.mean()), float(values.std()) or 1.0
    return schema


def encode_rows(table: Table, rows: np.ndarray, schema: TableSchema) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The shard columns of `rows`, and the counts of imputed numbers and unseen categories."""
    columns: dict[str, np.ndarray] = {}
    counts = {"imputed": 0, "unseen": 0, "missing_categories": 0}
    if schema.numeric:
        numbers = np.stack([table.columns[name][rows] for name in schema.numeric], axis=1)
        missing = np.isnan(numbers)
        counts["imputed"] = int(missing.sum())
        columns["numeric"] = np.where(missing, np.asarray(schema.numeric_mean), numbers).astype(np.float32)
    if schema.categorical:
        codes = np.zeros((len(rows), len(schema.categorical)), np.int32)
        for column, name in enumerate(schema.categorical):
            index = {value: code for code, value in enumerate(schema.categories[name])}
            values = table.columns[name][rows]
            codes[:, column] = [1 if value is None else index.get(value, 0) for value in values]
        counts["unseen"] = int((codes == 0).sum())
        counts["missing_categories"] = int((codes == 1).sum())
        columns["categorical"] = codes
    labels = table.columns[schema.target][rows]
    if schema.kind == "classification":
        index = {label: code for code, label in enumerate(schema.classes)}
        columns["target"] = np.array([index[label] for label in labels], np.int32).reshape(-1, 1)
    else:
        columns["target"] = labels.astype(np.float32).reshape(-1, 1)
    return columns, counts


def feature_arrays(rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A shard's (numeric, categorical) arrays, a kind the table lacks as a zero-width array."""
    count = len(rows["target"])
    return rows.get("numeric", np.zeros((count, 0), np.float32)), rows.get("categorical", np.zeros((count, 0), np.int32))


# ------------------------------------------------------------------------------------------- prep
def prepare_table(data: DataConfig, store: Store, run: StageRun, source: FileSource | None) -> tuple[dict, dict]:
    """Read, check, split, encode and write the table (module docstring); (metrics, details)."""
    table, kind, numeric, categorical = read_table(data, source)
    read = len(table.origins)
    table = drop_bad_rows(table, data, kind, numeric)
    labels = table.columns[data.table.target] if kind == "classification" else None
    splits = split_rows(labels, len(table.origins), data.val_fraction, data.test_fraction, data.seed)
    schema = fit_schema(table, splits["train"], kind, data.table.target, numeric, categorical)
    metrics: dict = {"rows_read": read, "rows_dropped": read - len(table.origins), "features": len(numeric) + len(categorical)}
    written = {}
    for name, rows in splits.items():
        columns, counts = encode_rows(table, rows, schema)
        written[name] = {"shards": write_shards(run, name, columns, data.rows_per_shard), "rows": int(len(rows)), "tokens": int(len(rows))}
        metrics[f"{name}_rows"] = int(len(rows))
        metrics |= {f"{name}_{count}": value for count, value in counts.items() if value}
    if table.dropped:
        metrics["dropped_by_cause"] = table.dropped
    if kind == "classification":
        counts = np.bincount(np.array([schema.classes.index(label) for label in labels[splits["train"]]]), minlength=schema.outputs)
        metrics["majority_share"] = float(counts.max() / counts.sum())
        metrics["majority_class"] = int(counts.argmax())
    details = {
        "seq_len": 1, "vocab_size": schema.outputs, "special_token_ids": None, "splits": written, "table": schema.to_dict(),
        "widths": {"numeric": len(numeric), "categorical": len(categorical)},
    }
    return metrics, details

