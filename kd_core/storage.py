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

`file_identity` says whether a file changed without reading it where the store can tell (an
ETag, or size and modification time); a step's key covers the identities of the files it reads.
"""

from __future__ import annotations

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


def url_to_fs(url: str, config: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of any URL a job names, with the job's settings for its protocol."""
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
    silently): else a `StorageError` naming `field`, `url` and the bucket. Local paths pass."""
    if isinstance(fs, LocalFileSystem) or "://" not in url or url.startswith("file://"):
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
    cached = _hash_cache_folder() / f"{hashlib.sha256(stamp.encode()).hexdigest()[:32]}.sha256"
    try:
        return f"sha256:{cached.read_text().strip()}"
    except OSError:
        pass
    digest = sha256_of(fs, path)
    try:  # best effort: a read-only home only costs hashing again next time
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.name}.{os.getpid()}")
        staging.write_text(digest)
        os.replace(staging, cached)
    except OSError:
        pass
    return f"sha256:{digest}"


def sha256_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_cache_folder() -> Path:
    return Path(os.environ.get("KDFLOW_CACHE", Path.home() / ".cache" / "kdflow")) / "hashes"


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

    def download_dir(self, relative: str, local_dir: str | Path) -> Path:
        """Make a remote folder available on local disk (a no-op view for local stores)."""
        local = self.local_path(relative)
        if local is not None:
            return local
        local_dir = Path(local_dir)
        if local_dir.exists():
            shutil.rmtree(local_dir)
        local_dir.mkdir(parents=True)
        prefix = self.path(relative).rstrip("/")
        for remote in self.fs.find(prefix):
            destination = local_dir / remote[len(prefix) + 1 :]
            destination.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(destination))
        return local_dir



_FILE_MODE = _file_mode()
