"""Raw text sources for the prep stage; each yields documents (plain strings).

- `python_docs()`: real English technical prose that ships with every CPython install: the
  language reference topics of `pydoc_data` and the long docstrings of the standard library.
  No download, identical on every machine with the same Python.
- `file_documents(urls)`: `.txt`, `.jsonl` and `.parquet` files on any fsspec store.

Long documents are cut at paragraph boundaries into pieces of at most `MAX_DOC_CHARS`, so that a
held-out split is a spread of many pieces, not a handful of huge topics.
"""

from __future__ import annotations

import ast
import io
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from kd_core.errors import InputError

MAX_DOC_CHARS = 4000
MIN_DOCSTRING_CHARS = 200
_SKIPPED_STDLIB_PARTS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


class DataSourceError(InputError):
    """Raw input that cannot be read; names the file and what to do."""


def python_docs() -> Iterator[str]:
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


def split_long(text: str, limit: int = MAX_DOC_CHARS) -> Iterator[str]:
    """Cut text into pieces of at most `limit` characters, at blank lines where possible."""
    piece: list[str] = []
    size = 0
    for paragraph in _paragraphs(text, limit):
        if piece and size + len(paragraph) > limit:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(paragraph)
        size += len(paragraph) + 2
    if piece and size > 0:
        yield "\n\n".join(piece)


def _paragraphs(text: str, limit: int) -> Iterator[str]:
    """Blank-line paragraphs; one longer than `limit` is cut at a space (or hard, if it has none)."""
    for paragraph in text.split("\n\n"):
        while len(paragraph) > limit:
            cut = paragraph.rfind(" ", limit // 2, limit)
            cut = cut if cut > 0 else limit
            yield paragraph[:cut]
            paragraph = paragraph[cut:]
        yield paragraph


def matching_files(pattern: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem of one `data.files` entry and the paths it names (a glob's matches, sorted)."""
    fs, _ = fsspec.core.url_to_fs(pattern, **storage_options)
    matches = sorted(fs.glob(pattern)) if any(ch in pattern for ch in "*?[") else [fs._strip_protocol(pattern)]
    if not matches:
        raise DataSourceError(f"data.files: {pattern!r} matches no file")
    return fs, matches


def file_documents(urls: list[str], text_field: str, storage_options: dict) -> Iterator[str]:
    for pattern in urls:
        fs, matches = matching_files(pattern, storage_options)
        for path in matches:
            yield from _read_one(fs, path, text_field)


def _read_one(fs: fsspec.AbstractFileSystem, path: str, text_field: str) -> Iterator[str]:
    if not fs.exists(path):
        raise DataSourceError(f"data.files: {path} does not exist")
    data = fs.cat_file(path)
    if path.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        if text_field not in table.column_names:
            raise DataSourceError(f"{path}: no column {text_field!r} (data.text_field); columns are {table.column_names}")
        for text in table.column(text_field).to_pylist():
            if text:
                yield from split_long(str(text))
    elif path.endswith((".jsonl", ".json")):
        for line_number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataSourceError(
                    f"{path}:{line_number}: expected a JSON object with a {text_field!r} field (data.text_field)"
                ) from None
            yield from split_long(str(text))
    elif path.endswith((".txt", ".md", ".rst")):
        yield from split_long(data.decode("utf-8", errors="replace"))
    else:
        raise DataSourceError(f"{path}: unsupported file type; use .txt, .md, .rst, .jsonl or .parquet")
