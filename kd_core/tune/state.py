"""Ray Tune's experiment state: restored only when this stage wrote it.

A search keeps its state in `<stage folder>/search/`: `tuner.pkl`, `experiment_state-*.json`
(JSON that carries cloudpickled objects), `searcher-state-*.pkl` and `callback-states-*.pkl`.
`Tuner.restore` unpickles them, and unpickling runs code: whoever can write those files can run
code in the tune step. `storage.root` must therefore be trusted, writable only by the pipeline's
own identities (docs/ARCHITECTURE.md says so).

Beyond that, the stage refuses state it did not write. The Tuner gets the store through
`search_storage`, a pyarrow filesystem that hashes every state file Ray writes into `search/` and
records its sha256 in `<stage folder>/search_state.sha256.json` before the write completes (so a
file in the store always has its digest recorded, even after a kill). The last few digests of each
file are kept: a kill may come between recording a new version and the upload that replaces the
old one. Before a restore, `check_search_state` hashes every state file in `search/` and stops
with `SearchStateError`, naming the file and what to do, when one is not in the record: planted,
edited, copied from another search or left by a search that did not record digests. Nothing has
been unpickled by then.

This is an integrity check, not a signature: whoever can write `storage.root` can rewrite the
record as well; it keeps out state that did not come from this step.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import threading

import pyarrow.fs

from kd_core.errors import InputError
from kd_core.storage import Store, sha256_of

SEARCH_FOLDER = "search"
DIGESTS_NAME = "search_state.sha256.json"
"""In the stage folder, beside `search/`: state file name -> the sha256s of its last versions."""
KEPT_VERSIONS = 8
STATE_SUFFIXES = (".json", ".pkl")
"""What `Tuner.restore` reads from the top of the experiment folder (Ray's sync-down takes these)."""


class SearchStateError(InputError):
    """A Ray Tune state file that the tune step did not write: restoring would unpickle it."""


def search_storage(store: Store, folder: str) -> tuple[str, pyarrow.fs.FileSystem]:
    """The `storage_path` and `storage_filesystem` for the search's Tuner (new or restored): the
    store's own fsspec filesystem (endpoint, credentials), recording the digest of each state file."""
    handler = StateRecordingHandler(store, f"{folder}/{SEARCH_FOLDER}", f"{folder}/{DIGESTS_NAME}")
    return store.path(folder), pyarrow.fs.PyFileSystem(handler)


def check_search_state(store: Store, folder: str) -> None:
    """Every state file in `<folder>/search/` is one the tune step wrote (see the module
    docstring), else `SearchStateError`. Nothing in `search/` is read except to hash it."""
    search = f"{folder}/{SEARCH_FOLDER}"
    if not store.exists(search):
        return
    state_files = [
        info["name"] for info in store.fs.ls(store.path(search), detail=True)
        if info["type"] == "file" and info["name"].endswith(STATE_SUFFIXES)
    ]
    if not state_files:
        return
    record = f"{folder}/{DIGESTS_NAME}"
    recorded = _read_digests(store, record)
    for path in sorted(state_files):
        name = posixpath.basename(path)
        digest = sha256_of(store.fs, path)
        if digest not in recorded.get(name, []):
            raise SearchStateError(
                f"{store.url(search)}/{name}: a Ray Tune state file this tune step did not write (its sha256 {digest[:16]}... "
                f"is not in {store.url(record)}), and restoring would unpickle it; delete {store.url(search)} "
                "(or rerun with --force tune) to start the search afresh"
            )


def _read_digests(store: Store, record: str) -> dict[str, list[str]]:
    if not store.exists(record):
        return {}
    try:
        recorded = json.loads(store.read_bytes(record))
    except ValueError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


class StateRecordingHandler(pyarrow.fs.FSSpecHandler):
    """pyarrow's handler of the store's fsspec filesystem, recording the sha256 of each state file
    written into the experiment folder. Pickled (Ray sends the storage filesystem to its trials and
    keeps it in `tuner.pkl`) it carries the filesystem and paths only: copies elsewhere record
    nothing, and the driver hands a fresh one to every `Tuner` and `Tuner.restore`."""

    def __init__(self, store: Store, search: str, record: str):
        super().__init__(store.fs)
        self.search_path = store.path(search).rstrip("/")
        self.record = record
        self._store: Store | None = store
        self._recorded: dict[str, list[str]] | None = None
        """The record as this handler last wrote it (read once: only the driver writes it)."""
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"fs": self.fs, "search_path": self.search_path, "record": self.record}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _store=None, _recorded=None, _lock=threading.Lock())

    def open_output_stream(self, path, metadata):
        name = self._state_name(path)
        if name is None:
            return super().open_output_stream(path, metadata)
        return pyarrow.PythonFile(_DigestingWriter(self.fs.open(path, mode="wb"), lambda digest: self.remember(name, digest)), mode="w")

    def copy_file(self, src, dest):
        self._remember_copy(src, dest)
        super().copy_file(src, dest)

    def move(self, src, dest):
        self._remember_copy(src, dest)
        super().move(src, dest)

    def _remember_copy(self, src: str, dest: str) -> None:
        name = self._state_name(dest)
        if name is not None:
            self.remember(name, sha256_of(self.fs, src))

    def _state_name(self, path: str) -> str | None:
        """The file name of a state file directly in the experiment folder; None for anything else."""
        path = path.rstrip("/")
        if posixpath.dirname(path).rstrip("/") != self.search_path or not path.endswith(STATE_SUFFIXES):
            return None
        return posixpath.basename(path)

    def remember(self, name: str, digest: str) -> None:
        """Add `digest` to `name`'s versions in the record (written atomically)."""
        if self._store is None:
            return
        with self._lock:
            if self._recorded is None:
                self._recorded = _read_digests(self._store, self.record)
            versions = [known for known in self._recorded.get(name, []) if known != digest] + [digest]
            self._recorded[name] = versions[-KEPT_VERSIONS:]
            self._store.write_bytes(self.record, json.dumps(self._recorded, indent=1, sort_keys=True).encode())


class _DigestingWriter:
    """A binary file for pyarrow's PythonFile: hashes what passes through, reports the digest
    when closed, then closes the file underneath (on an object store, the upload commits then)."""

    def __init__(self, target, on_close):
        self._target, self._on_close = target, on_close
        self._digest = hashlib.sha256()
        self.closed = False

    def write(self, data) -> int:
        self._digest.update(data)
        return self._target.write(data)

    def flush(self) -> None:
        self._target.flush()

    def tell(self) -> int:
        return self._target.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._on_close(self._digest.hexdigest())
        self._target.close()
