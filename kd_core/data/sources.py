"""Raw text sources for the prep stage; each yields documents (plain strings).

- `python_docs()`: real English technical prose that ships with every CPython install: the
  language reference topics of `pydoc_data` and the long docstrings of the standard library.
  No download, identical on every machine with the same Python; extracted once per machine and
  Python (kept under `KDFLOW_CACHE`).
- `FileSource`: `.txt` / `.md` / `.rst`, `.jsonl`, `.parquet` and `.arrow` (Arrow IPC, as a
  Hugging Face `datasets` folder holds its data) files on any fsspec store, named by `data.files`
  (URLs, globs or folders), optionally compressed (`.jsonl.gz`, `.txt.bz2`, `.xz`). `records()`
  gives the records of the JSON Lines, Parquet and Arrow files as dicts, each with its
  `file:line` (chat data, `kd_core/data/chat.py`).
  A folder is read recursively, skipping hidden files, `README*` and `.json` files (metadata that
  tools such as `datasets.save_to_disk` write beside the data); name a `.json` file explicitly
  to read it as JSON Lines.

How files become documents:
- a text file is one document; a JSON Lines record or a Parquet or Arrow row is one document (the
  string in `data.text_field`);
- null and empty (whitespace-only) values are skipped and counted; any other non-string value is
  an error naming `file:line` (a number or a nested object is not text to train on);
- every file must be UTF-8 (a leading byte-order mark is dropped); anything else is an error
  naming `file:line`;
- long documents are cut at paragraph boundaries (blank lines) into pieces of at most
  `MAX_DOC_CHARS`, so that a held-out split is a spread of many pieces, not a handful of huge
  topics. Files are read as a stream and cut in linear time: memory holds one piece, not the file.

`FileSource.listing()` is the identity of every matched file (URL, size, ETag or modification
time): the prep step's key covers it, so an edited or added file is seen.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from kd_core.config import StorageConfig
from kd_core.errors import InputError
from kd_core.storage import check_bucket, file_identity, keep_locally, local_cache_folder, reaching, url_to_fs

MAX_DOC_CHARS = 4000
MIN_DOCSTRING_CHARS = 200
READ_CHARS = 1 << 20
"""Characters decoded per read of a text file."""
_SKIPPED_STDLIB_PARTS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
"""Arrow IPC files, as a Hugging Face `datasets` folder (`save_to_disk`) holds its data."""
TABLE_SUFFIXES = (".csv", ".parquet")
"""The tables of a tabular task (`data.source: table`); a CSV file may be compressed (`.csv.gz`)."""
TABLE_SUPPORTED = "a .csv (optionally .gz, .bz2 or .xz compressed) or .parquet file, or a folder of them"
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")
"""Compressions Python reads without extra packages (fsspec infers them from the suffix)."""
DATA_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
SUPPORTED = (
    "a .txt, .md, .rst, .jsonl, .parquet or .arrow file (text and JSON Lines optionally .gz, .bz2 or .xz compressed), "
    "or a folder of them (a Hugging Face datasets folder)"
)


class DataSourceError(InputError):
    """Raw input that cannot be read; names the file and what to do."""


# ----------------------------------------------------------------------------------- bundled text
def python_docs() -> Iterator[str]:
    """The bundled corpus, in its fixed order. Extracting it parses the whole standard library
    (about 6 s on 2 cores), so a complete extraction is kept as JSON in `KDFLOW_CACHE/python-docs`
    and read back by later runs on this machine. Its name covers the Python build and this file's
    code: another Python, or a change to how documents are cut, extracts them anew."""
    kept = _kept_python_docs()
    try:
        documents = json.loads(kept.read_bytes()) if kept else None
    except (OSError, ValueError):
        documents = None
    if isinstance(documents, list) and all(isinstance(document, str) for document in documents):
        yield from documents
        return
    extracted = []
    for document in _extract_python_docs():
        extracted.append(document)
        yield document
    if kept:  # only once a reader took them all
        keep_locally(kept, json.dumps(extracted).encode())


def _kept_python_docs() -> Path | None:
    """Where this Python's extraction is kept: named by the Python build, its standard library and
    this file's code (it cuts the documents); None where this file's source cannot be read."""
    digest = hashlib.sha256(json.dumps([sys.version, sysconfig.get_paths()["stdlib"]]).encode())
    try:
        digest.update(Path(__file__).read_bytes())
    except OSError:
        return None
    return local_cache_folder("python-docs") / f"{digest.hexdigest()[:24]}.json"


def _extract_python_docs() -> Iterator[str]:
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield from split_long(pydoc_data.topics.topics[name])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for source_file in sorted(stdlib.rglob("*.py")):
        if _SKIPPED_STDLIB_PARTS.intersection(source_file.relative_to(stdlib).parts):
            continue
        for docstring in _docstrings(source_file):
            yield from split_long(docstring)


def _docstrings(source_file: Path) -> Iterator[str]:
    try:
        tree = ast.parse(source_file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
                yield docstring


# ------------------------------------------------------------------------------ cutting documents
def split_long(text: str, limit: int = MAX_DOC_CHARS) -> Iterator[str]:
    """Cut text into pieces of at most `limit` characters, at blank lines where possible."""
    if len(text) <= limit:  # what split_stream gives too: every paragraph fits in one piece
        return iter((text,))
    return split_stream([text], limit)


def split_stream(chunks: Iterable[str], limit: int = MAX_DOC_CHARS) -> Iterator[str]:
    """`split_long` of the concatenated chunks, read one chunk at a time, in linear time."""
    piece: list[str] = []
    size = 0
    for paragraph in _paragraphs(chunks, limit):
        if piece and size + len(paragraph) > limit:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(paragraph)
        size += len(paragraph) + 2
    if piece:
        yield "\n\n".join(piece)


def _paragraphs(chunks: Iterable[str], limit: int) -> Iterator[str]:
    """The blank-line paragraphs of the concatenated chunks; one longer than `limit` is cut at a
    space (or hard, if it has none). An unfinished paragraph longer than `limit` is cut as soon as
    it is, so the text held between chunks stays under `limit` characters."""
    if limit < 2:
        raise ValueError(f"limit must be at least 2, got {limit}")
    carry = ""
    for chunk in chunks:
        buffer = carry + chunk
        start = 0
        while (end := buffer.find("\n\n", start)) >= 0:
            yield from _cut(buffer, start, end, limit)
            start = end + 2
        # A trailing "\n" may open the next paragraph break: it is not known to be paragraph text yet.
        known_end = len(buffer) - buffer.endswith("\n")
        start = yield from _cut_while_longer(buffer, start, known_end, limit)
        carry = buffer[start:]
    yield from _cut(carry, 0, len(carry), limit)


def _cut(text: str, start: int, end: int, limit: int) -> Iterator[str]:
    """text[start:end] in pieces of at most `limit`, cut at the last space of each piece's second half."""
    start = yield from _cut_while_longer(text, start, end, limit)
    yield text[start:end]


def _cut_while_longer(text: str, start: int, end: int, limit: int):
    """Yields the cuts of text[start:end] while more than `limit` remains; returns where the rest starts."""
    while end - start > limit:
        cut = text.rfind(" ", start + limit // 2, start + limit)
        cut = cut if cut >= 0 else start + limit
        yield text[start:cut]
        start = cut
    return start


# ------------------------------------------------------------------------------------ data files
@dataclass(frozen=True)
class MatchedFile:
    url: str
    """The file's URL (with protocol for remote stores), as named in errors."""
    path: str
    """Its path on `fs`."""
    size: int
    identity: str
    """ETag, or modification time and size, or sha256: what changes when the file does."""
    fs: fsspec.AbstractFileSystem = field(compare=False, repr=False)
    """The filesystem it is on, with the job's settings for its protocol."""


@dataclass
class SourceCounts:
    """What collecting skipped, for the manifest and the summary."""

    files: int = 0
    skipped_empty: int = 0
    """Records whose text was null or empty (or whitespace only)."""


class FileSource:
    """The files `data.files` names: every URL, glob and folder expanded, each file once."""

    def __init__(self, patterns: list[str], text_field: str, storage: StorageConfig, *, tables: bool = False):
        """`tables`: match the CSV and Parquet tables of a tabular task instead of documents."""
        self.text_field = text_field
        self.suffixes, self.supported = (TABLE_SUFFIXES, TABLE_SUPPORTED) if tables else (DATA_SUFFIXES, SUPPORTED)
        self.files: list[MatchedFile] = []
        seen: set[str] = set()
        for pattern in patterns:
            for matched in self._expand(pattern, storage):
                if matched.url not in seen:  # a file matched by two patterns is read once
                    seen.add(matched.url)
                    self.files.append(matched)

    def _expand(self, pattern: str, storage: StorageConfig) -> list[MatchedFile]:
        fs, _ = url_to_fs(pattern, storage)
        with reaching(pattern, "data.files"):
            infos = _listing(fs, pattern)
        matched = []
        for path, info in sorted(infos.items()):
            if info.get("_in_folder") and _not_data(path, self.suffixes):
                continue
            if not path.endswith(self.suffixes) and not _is_compressed(path, self.suffixes):
                if _is_glob(pattern):
                    continue  # a glob may match other files (a _SUCCESS marker)
                raise DataSourceError(f"data.files: {_url(fs, path)}: unsupported file type; use {self.supported}")
            matched.append(MatchedFile(_url(fs, path), path, int(info.get("size") or 0), file_identity(fs, path, info), fs))
        if not matched:
            check_bucket(fs, pattern, "data.files")
            raise DataSourceError(f"data.files: {pattern!r} matches no file ({self.supported})")
        return matched

    def listing(self) -> list[dict]:
        """Each matched file's URL, size and identity, in reading order (what the prep key covers)."""
        return [{"url": file.url, "size": file.size, "identity": file.identity} for file in self.files]

    def check_records(self, files: int = 20) -> None:
        """Read the first record of up to `files` files (each file's format, encoding and text
        field), raising what reading them all would raise first; reads at most the first
        megabyte of each."""
        for file in self.files[:files]:
            counts = SourceCounts()
            with reaching(file.url, "data.files"):
                next(_read_one(file, self.text_field, counts, lambda position: None), None)

    @property
    def total_bytes(self) -> int:
        return sum(file.size for file in self.files)

    def documents(self, counts: SourceCounts, advance: Callable[[int], None] = lambda n: None) -> Iterator[str]:
        """Every document of every file, cut into pieces; `advance(bytes)` as the files are read."""
        for file in self.files:
            reported = 0

            def read_up_to(position: int) -> None:
                nonlocal reported
                position = min(position, file.size)
                advance(position - reported)
                reported = max(reported, position)

            with reaching(file.url, "data.files"):
                yield from _read_one(file, self.text_field, counts, read_up_to)
            read_up_to(file.size)
            counts.files += 1


    def records(self, advance: Callable[[int], None] = lambda n: None) -> Iterator[tuple[str, dict]]:
        """Every record of every JSON Lines, Parquet or Arrow file as (where it is, the record):
        `file:line` for JSON Lines, `file:row N` (from 1) for the others. A text file holds no
        records: an error naming it."""
        for file in self.files:
            name = file.path[: file.path.rfind(".")] if _is_compressed(file.path) else file.path
            with reaching(file.url, "data.files"):
                if name.endswith(JSON_SUFFIXES):
                    yield from _jsonl_records(file)
                elif name.endswith(PARQUET_SUFFIXES + ARROW_SUFFIXES):
                    for number, record in enumerate(_table_rows(file), start=1):
                        yield f"{file.url}:row {number}", record
                else:
                    raise DataSourceError(f"data.files: {file.url} is a text file; records come from JSON Lines, Parquet or Arrow files")
            advance(file.size)


def _listing(fs: fsspec.AbstractFileSystem, pattern: str) -> dict[str, dict]:
    """path -> info of what one entry names: a glob's matches, a folder's files, or one file (one
    listing request per prefix on an object store, never an earlier listing kept by the filesystem)."""
    fs.invalidate_cache()
    if _is_glob(pattern):
        infos = fs.glob(pattern, detail=True)
    else:
        path = fs._strip_protocol(pattern)
        try:  # `info`, not `exists`: s3fs's exists answers False to an endpoint that does not answer
            infos = {path: fs.info(path)}
        except FileNotFoundError:
            raise DataSourceError(f"data.files: {pattern} does not exist") from None
    expanded: dict[str, dict] = {}
    for path, info in infos.items():
        if info.get("type") == "directory":
            for inner, inner_info in fs.find(path, detail=True).items():
                expanded[inner] = {**inner_info, "_in_folder": True}
        else:
            expanded[path] = info
    return expanded


def _not_data(path: str, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> bool:
    """In a folder: what is beside the data rather than data (hidden files, READMEs, .json metadata)."""
    name = path.rsplit("/", 1)[-1]
    return name.startswith((".", "_")) or name.upper().startswith("README") or name.endswith(".json") or not (
        name.endswith(suffixes) or _is_compressed(name, suffixes)
    )


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _is_compressed(path: str, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> bool:
    """A compressed text, JSON Lines or CSV file of one of `suffixes` (Parquet compresses itself)."""
    compressible = tuple(suffix for suffix in suffixes if suffix in TEXT_SUFFIXES + JSON_SUFFIXES + (".csv",))
    return path.endswith(COMPRESSION_SUFFIXES) and path[: path.rfind(".")].endswith(compressible)


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def _read_one(file: MatchedFile, text_field: str, counts: SourceCounts, read_up_to) -> Iterator[str]:
    """`read_up_to(byte)` reports progress through the file (decompressed bytes for a compressed one)."""
    name = file.path[: file.path.rfind(".")] if _is_compressed(file.path) else file.path
    if name.endswith(PARQUET_SUFFIXES):
        yield from _parquet_documents(file, text_field, counts)
    elif name.endswith(ARROW_SUFFIXES):
        yield from _arrow_documents(file, text_field, counts)
    elif name.endswith(JSON_SUFFIXES):
        yield from _jsonl_documents(file, text_field, counts, read_up_to)
    else:
        yield from _text_documents(file, read_up_to)


def _text_stream(file: MatchedFile) -> tuple[io.TextIOWrapper, io.IOBase]:
    """The file decoded as strict UTF-8 (BOM dropped, any newline convention read as \\n),
    decompressed by its suffix; and the byte stream under it (its position is the progress)."""
    raw = file.fs.open(file.path, "rb", compression="infer")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict"), raw


def _text_documents(file: MatchedFile, read_up_to) -> Iterator[str]:
    stream, raw = _text_stream(file)

    def chunks() -> Iterator[str]:
        try:
            while chunk := stream.read(READ_CHARS):
                read_up_to(raw.tell())
                yield chunk
        except UnicodeDecodeError as err:
            raise _not_utf8(file, err) from None

    with stream:
        yield from (piece for piece in split_stream(chunks()) if piece.strip())


def _jsonl_documents(file: MatchedFile, text_field: str, counts: SourceCounts, read_up_to) -> Iterator[str]:
    stream, raw = _text_stream(file)
    with stream:
        for line_number, line in enumerate(_lines(stream, file, lambda: read_up_to(raw.tell())), start=1):
            if line.strip():
                text = _record_text(line, f"{file.url}:{line_number}", text_field)
                if text is None or not text.strip():
                    counts.skipped_empty += 1
                    continue
                yield from split_long(text)


def _lines(stream: io.TextIOWrapper, file: MatchedFile, on_chunk) -> Iterator[str]:
    """The stream's lines, read a large chunk at a time (a readline per record is slower)."""
    unfinished: list[str] = []  # pieces of a line longer than one chunk, joined once it ends
    try:
        while chunk := stream.read(READ_CHARS):
            on_chunk()
            lines = chunk.split("\n")
            if len(lines) == 1:
                unfinished.append(chunk)
                continue
            lines[0] = "".join([*unfinished, lines[0]])
            unfinished = [lines.pop()]
            yield from lines
    except UnicodeDecodeError as err:
        raise _not_utf8(file, err) from None
    if last := "".join(unfinished):
        yield last


def _json_line(line: str, where: str):
    """One JSON Lines record, parsed; errors name `where` (an array gets the command that splits it)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise DataSourceError(f"{where}: not valid JSON; JSON Lines expected: one JSON object per line") from None
    if isinstance(record, list):
        raise DataSourceError(
            f"{where}: a JSON array; JSON Lines expected: one JSON object per line (convert with: jq -c '.[]' FILE)"
        )
    return record


def _record_text(line: str, where: str, text_field: str) -> str | None:
    record = _json_line(line, where)
    if not isinstance(record, dict) or text_field not in record:
        raise DataSourceError(f"{where}: expected a JSON object with a {text_field!r} field (data.text_field)")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise DataSourceError(
            f"{where}: field {text_field!r} (data.text_field) holds {type(text).__name__} {_preview(text)}; expected a string"
        )
    return text


def _parquet_documents(file: MatchedFile, text_field: str, counts: SourceCounts) -> Iterator[str]:
    with file.fs.open(file.path, "rb") as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataSourceError(f"{file.url}: not a readable Parquet file ({err}); rewrite it or drop it from data.files") from None
        schema = parquet.schema_arrow
        if text_field not in schema.names:
            raise DataSourceError(f"{file.url}: no column {text_field!r} (data.text_field); columns are {schema.names}")
        column_type = schema.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise DataSourceError(
                f"{file.url}: column {text_field!r} (data.text_field) has type {column_type}; expected strings"
            )
        try:
            for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text is None or not text.strip():
                        counts.skipped_empty += 1
                        continue
                    yield from split_long(text)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataSourceError(f"{file.url}: a damaged Parquet file ({err}); rewrite it or drop it from data.files") from None


def _arrow_documents(file: MatchedFile, text_field: str, counts: SourceCounts) -> Iterator[str]:
    for number, record in enumerate(_table_rows(file), start=1):
        if text_field not in record:
            raise DataSourceError(f"{file.url}: no column {text_field!r} (data.text_field); columns are {sorted(record)}")
        text = record[text_field]
        if text is not None and not isinstance(text, str):
            raise DataSourceError(f"{file.url}:row {number}: field {text_field!r} (data.text_field) holds {type(text).__name__}; expected a string")
        if text is None or not text.strip():
            counts.skipped_empty += 1
            continue
        yield from split_long(text)


def _jsonl_records(file: MatchedFile) -> Iterator[tuple[str, dict]]:
    stream, _ = _text_stream(file)
    with stream:
        for line_number, line in enumerate(_lines(stream, file, lambda: None), start=1):
            if not line.strip():
                continue
            where = f"{file.url}:{line_number}"
            record = _json_line(line, where)
            if not isinstance(record, dict):
                raise DataSourceError(f"{where}: a JSON {type(record).__name__}; JSON Lines expected: one JSON object per line")
            yield where, record


def _table_rows(file: MatchedFile) -> Iterator[dict]:
    """The rows of a Parquet file or an Arrow IPC file (stream or file format, as `datasets`
    and pyarrow write them), as dicts, a batch at a time."""
    with file.fs.open(file.path, "rb") as handle:
        try:
            if file.path.endswith(PARQUET_SUFFIXES):
                batches = pq.ParquetFile(handle).iter_batches(batch_size=1024)
            else:
                data = handle.read()
                try:
                    batches = iter(pa.ipc.open_stream(data))
                except pa.ArrowInvalid:
                    batches = (reader.get_batch(i) for reader in [pa.ipc.open_file(data)] for i in range(reader.num_record_batches))
            for batch in batches:
                yield from batch.to_pylist()
        except (pa.ArrowInvalid, OSError) as err:
            raise DataSourceError(f"{file.url}: not a readable {'Parquet' if file.path.endswith(PARQUET_SUFFIXES) else 'Arrow'} file ({err}); rewrite it or drop it from data.files") from None


def _not_utf8(file: MatchedFile, err: UnicodeDecodeError) -> DataSourceError:
    return DataSourceError(
        f"{file.url}:{_first_bad_line(file)}: not UTF-8 text ({err.reason}); "
        "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8"
    )


def _first_bad_line(file: MatchedFile) -> int | str:
    """The number of the first line that is not UTF-8 (the decoder reads ahead, so the error
    itself does not say); read again, only on this error path."""
    with file.fs.open(file.path, "rb", compression="infer") as raw:
        for number, line in enumerate(raw, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return "?"


def _preview(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def matching_files(pattern: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem of one `data.files` entry and the paths it names (a glob's matches, sorted)."""
    fs, _ = url_to_fs(pattern, storage)
    with reaching(pattern, "data.files"):
        paths = sorted(_listing(fs, pattern))
    if not paths:
        raise DataSourceError(f"data.files: {pattern!r} matches no file")
    return fs, paths
