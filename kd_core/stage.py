"""The stage contract, shared by every stage.

A stage is a plain function: its config section and its input manifests in, a manifest out.
`StageRun` does the bookkeeping so a stage function holds only its own logic:

    run = StageRun(store, "prep", data_config, inputs={}, force=force)
    if run.reused:
        return run.reused
    with run.timed("tokenize"):
        ...
    run.write_bytes("tokenizer.json", data)
    return run.finish(metrics={...}, details={...})

The stage's folder is `<root>/<stage>/<key>`, where the key hashes the stage name, its code
version, its config section and its inputs' keys. The same inputs give the same key, and a key
whose manifest is complete is skipped (unless forced). Forcing deletes the old manifest first, so
a forced run that dies midway leaves the stage incomplete, never stale-but-complete.

Inside `with reuse_only():` a stage whose manifest is missing raises instead of running: how a
caller collects the manifests of steps that ran elsewhere (a KubeRay RayJob, a kfp.local DAG)
without ever redoing their work by accident.

`StageLease` keeps two runs of one training step apart (a retried pod beside a live one, two
overlapping schedules): the step holds `LEASE.json` in its folder, created by a conditional write
and renewed while it trains. A second run waits for it, reuses the manifest the first one commits,
takes over a lease whose holder stopped renewing it, or after `compute.lease_wait_s` says who
holds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kd_core.config import public_dict, section_hash
from kd_core.errors import RunStopped
from kd_core.manifest import (
    KEY_LENGTH,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    library_versions,
    read_manifest,
    stage_folder,
    write_manifest,
)
from kd_core.progress import say
from kd_core.storage import FileRecord, Store

# Bump a stage's number when its code changes what it writes: old outputs then stop matching.
STAGE_CODE_VERSIONS = {
    "prep": 5, "teacher": 2, "cache": 2, "student_tokenizer": 2, "distill": 2, "baseline": 2, "eval": 4, "register": 3, "tune": 2,
}


_REUSE_ONLY: ContextVar[bool] = ContextVar("kdflow_reuse_only", default=False)


@contextmanager
def reuse_only() -> Iterator[None]:
    """Stages started in this block return their existing manifest or raise `ManifestError`."""
    token = _REUSE_ONLY.set(True)
    try:
        yield
    finally:
        _REUSE_ONLY.reset(token)


def stage_key(stage: str, config_hash: str, input_keys: dict[str, str]) -> str:
    payload = json.dumps(
        {"stage": stage, "code": STAGE_CODE_VERSIONS[stage], "config": config_hash, "inputs": input_keys},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


class StageRun:
    """One execution (or skip) of a stage at its key."""

    def __init__(
        self,
        store: Store,
        stage: str,
        config: BaseModel | dict[str, Any],
        inputs: dict[str, Manifest],
        *,
        force: bool = False,
    ):
        self.store = store
        self.stage = stage
        self.config = public_dict(config) if isinstance(config, BaseModel) else dict(config)
        self.config_hash = section_hash(config)
        self.input_keys = {name: manifest.key for name, manifest in sorted(inputs.items())}
        self.key = stage_key(stage, self.config_hash, self.input_keys)
        self.folder = stage_folder(stage, self.key)
        self.outputs: dict[str, FileRecord] = {}
        self.timings: dict[str, float] = {}
        self._started = time.perf_counter()
        self.reused: Manifest | None = None
        if not force:
            self.reused = read_manifest(store, stage, self.key)
            if self.reused is not None:
                self.reused.reused = True
        if self.reused is None and _REUSE_ONLY.get():
            raise ManifestError(
                f"{stage} step {self.key}: no complete manifest at {store.url(self.folder + '/' + MANIFEST_NAME)}; "
                "it was expected to have run already (look at the log of the job that should have run it)"
            )
        if self.reused is None:
            store.delete(f"{self.folder}/{MANIFEST_NAME}")

    # ------------------------------------------------------------------------- outputs
    def relative(self, name: str) -> str:
        """Path of an output, relative to the store root."""
        return f"{self.folder}/{name}"

    def url(self, name: str) -> str:
        return self.store.url(self.relative(name))

    def name_of(self, relative: str) -> str:
        """Output name (path inside the stage folder) of a store-relative path."""
        prefix = f"{self.folder}/"
        if not relative.startswith(prefix):
            raise ValueError(f"{relative} is outside the {self.stage} stage folder {self.folder}")
        return relative[len(prefix) :]

    def _keep(self, name: str, record: FileRecord) -> FileRecord:
        self.outputs[name] = record
        return record

    def write_bytes(self, name: str, data: bytes) -> FileRecord:
        return self._keep(name, self.store.write_bytes(self.relative(name), data))

    def upload_file(self, local_file: str | Path, name: str) -> FileRecord:
        return self._keep(name, self.store.upload_file(local_file, self.relative(name)))

    def upload_dir(self, local_dir: str | Path, name: str) -> list[FileRecord]:
        records = self.store.upload_dir(local_dir, self.relative(name))
        for record in records:
            self.record(record)
        return records

    def record(self, record: FileRecord) -> None:
        """Adopt a file written into this stage's folder (by this process, a Ray actor or worker)."""
        self._keep(self.name_of(record.path), record)

    # ------------------------------------------------------------------------- timing
    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[step] = round(time.perf_counter() - started, 3)

    # ------------------------------------------------------------------------- finishing
    def finish(self, metrics: dict[str, Any] | None = None, details: dict[str, Any] | None = None) -> Manifest:
        """Write the manifest, last and atomically: from now on the stage counts as done."""
        self.timings["total"] = round(time.perf_counter() - self._started, 3)
        manifest = Manifest(
            stage=self.stage,
            key=self.key,
            config_hash=self.config_hash,
            config=self.config,
            inputs=self.input_keys,
            outputs=dict(sorted(self.outputs.items())),
            metrics=metrics or {},
            timings=self.timings,
            details=details or {},
            versions=library_versions(),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        write_manifest(self.store, manifest)
        return manifest


def reused_manifest(run: StageRun) -> Manifest:
    """The manifest another run committed at `run`'s key while this one waited for its lease."""
    manifest = read_manifest(run.store, run.stage, run.key)
    if manifest is None:
        raise ManifestError(f"{run.stage} step {run.key}: its manifest vanished after another run committed it; rerun the step")
    manifest.reused = True
    return manifest


# ------------------------------------------------------------------------------------------ lease
LEASE_NAME = "LEASE.json"


class StageBusy(RunStopped):
    """Another run holds the step's lease and did not finish within `compute.lease_wait_s`."""


class StageLease:
    """The lease on one step's folder (see the module docstring). Use as a context manager:

        with StageLease(store, "distill", folder, ttl_s, wait_s) as lease:
            if lease.finished_elsewhere: ...   # the other run committed its manifest meanwhile
    """

    def __init__(self, store: Store, stage: str, folder: str, ttl_s: float, wait_s: float, poll_s: float = 2.0):
        self.store, self.stage, self.folder = store, stage, folder
        self.ttl_s, self.wait_s, self.poll_s = ttl_s, wait_s, poll_s
        self.path = f"{folder}/{LEASE_NAME}"
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.finished_elsewhere = False
        self._since: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> StageLease:
        deadline, announced = time.monotonic() + self.wait_s, False
        while True:
            if announced and self.store.exists(f"{self.folder}/{MANIFEST_NAME}"):
                self.finished_elsewhere = True  # the run we waited for committed: reuse its work
                return self
            if self.store.create_exclusive(self.path, self._record()) and self._held():
                break
            current = self._read()
            if current is not None and (stopped := _stopped_holder(current)):
                say(f"[yellow]{self.stage} step: taking over the lease of {current['holder']}: {stopped}[/yellow]")
                self.store.delete(self.path)
                continue
            if time.monotonic() > deadline:
                raise StageBusy(self._busy_message(current))
            if not announced and current is not None:
                say(f"{self.stage} step: waiting for the run that holds {self.store.url(self.path)} ({current['holder']}, "
                    f"since {current['since']}); up to compute.lease_wait_s = {self.wait_s:.0f} s")
                announced = True
            time.sleep(self.poll_s)
        self._renewer = threading.Thread(target=self._renew, name="kdflow-stage-lease", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            if self._held():
                self.store.delete(self.path)

    def _record(self) -> bytes:
        self._since = self._since or datetime.now(timezone.utc).isoformat(timespec="seconds")
        return json.dumps({"holder": self.holder, "since": self._since, "renewed": time.time(), "ttl_s": self.ttl_s}).encode()

    def _read(self) -> dict | None:
        """The lease as written, or None when it is gone or half-written (a moment later it is not)."""
        try:
            return json.loads(self.store.read_bytes(self.path))
        except (FileNotFoundError, ValueError):
            return None

    def _held(self) -> bool:
        current = self._read()
        return current is not None and current["holder"] == self.holder

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.store.write_bytes(self.path, self._record())
            except Exception as err:  # a missed renewal is retried at the next one; the ttl allows two
                say(f"[yellow]{self.stage} step: could not renew its lease ({type(err).__name__}); retrying[/yellow]")

    def _busy_message(self, current: dict | None) -> str:
        holder = f"{current['holder']} (host:pid:id), since {current['since']}" if current else "another run"
        return (
            f"{self.stage} step {self.folder}: held by {holder} at {self.store.url(self.path)}; waited "
            f"compute.lease_wait_s = {self.wait_s:.0f} s. Let that run finish (a rerun then reuses its result) or stop it; "
            f"a lease that is not renewed expires after {self.ttl_s:.0f} s"
        )


def _stopped_holder(lease: dict) -> str | None:
    """Why the lease's holder no longer runs (its process on this machine is gone, or it stopped
    renewing), or None while it may still run."""
    host, pid, _ = lease["holder"].rsplit(":", 2)
    if host == socket.gethostname() and not _process_alive(int(pid)):
        return f"its process {pid} on this machine is gone"
    silent = time.time() - lease["renewed"]
    return f"not renewed for {silent:.0f} s" if silent > lease["ttl_s"] else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
