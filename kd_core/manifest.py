"""Stage manifests: the JSON record that says a stage happened and what it produced.

A manifest is written last and atomically, so a stage without a complete manifest did not happen.
It records the stage, its key and config hash, the keys of its inputs, every output (URL, bytes,
sha256), metrics, timings and library versions. Stage-specific facts that later stages need
(e.g. which shard holds which split) go under `details`; credentials written into a URL are
masked.

A manifest read back is checked before any of its names becomes a path: its stage is a plain
name, its key a stage key, and every output lies in the stage's own folder under a relative name
(no absolute path, no `..`). `read_manifest_url` takes only the manifest of a known stage under
the job's storage root.
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from kd_core.errors import InputError
from kd_core.redaction import redact_data
from kd_core.storage import FileRecord, StorageError, Store, relative_name

MANIFEST_NAME = "manifest.json"
HISTORY_NAME = "history.jsonl"
"""A training step's logged records, one JSON object a line, among its outputs (written by
`kd_core.train.loop`, read by `kd_core.eval.plots`)."""
SCHEMA_VERSION = 1
STAGE_NAME = re.compile(r"[a-z][a-z_]*")
KEY_LENGTH = 20
STAGE_KEY = re.compile(rf"[0-9a-f]{{{KEY_LENGTH}}}")
"""What `kd_core.stage.stage_key` makes: KEY_LENGTH lowercase hex digits."""
_TRACKED_LIBRARIES = ("kdflow", "torch", "transformers", "tokenizers", "ray", "mlflow", "pyarrow", "fsspec")


class ManifestError(InputError):
    """A manifest that is missing, unreadable or not what the caller needs."""


@dataclass
class Manifest:
    stage: str
    key: str
    config_hash: str
    config: dict[str, Any]
    inputs: dict[str, str]
    """Input stage name -> that stage's key."""
    outputs: dict[str, FileRecord]
    """Output name (path relative to the stage folder) -> record."""
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION
    reused: bool = field(default=False, compare=False)
    """Set when this run found the stage already complete and skipped it (never serialized)."""

    @property
    def folder(self) -> str:
        """The stage's folder, relative to the store root."""
        return stage_folder(self.stage, self.key)

    def output(self, name: str) -> FileRecord:
        try:
            return self.outputs[name]
        except KeyError:
            raise ManifestError(
                f"{self.stage} manifest {self.key} has no output {name!r}; it has {sorted(self.outputs)[:8]}"
            ) from None

    def files_under(self, folder: str) -> dict[str, FileRecord]:
        """The outputs inside `folder` (relative to the store root), by their name in that folder:
        what `Store.download_dir` checks a downloaded model folder against."""
        prefix = folder.rstrip("/") + "/"
        return {record.path[len(prefix) :]: record for record in self.outputs.values() if record.path.startswith(prefix)}

    def to_json(self) -> str:
        """The manifest as written, with credentials in URLs masked (`kd_core.redaction`): a data
        file or teacher named by a presigned or user:password URL is recorded without them."""
        record = asdict(self)
        del record["reused"]
        return json.dumps(redact_data(record), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        try:
            raw = json.loads(text)
            raw["outputs"] = {name: FileRecord(**record) for name, record in raw["outputs"].items()}
            if raw.get("schema_version") != SCHEMA_VERSION:
                raise ManifestError(f"{source}: schema_version {raw.get('schema_version')}, expected {SCHEMA_VERSION}")
            manifest = cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ManifestError(f"{source}: not a valid kdflow manifest ({err}); delete the folder and rerun the stage") from None
        manifest.check_names(source)
        return manifest

    def check_names(self, source: str) -> None:
        """Every name that will become a path is safe: the stage and key are what a stage writes,
        and each output lies in this stage's folder under a relative name."""
        fix = "it was not written by kdflow: delete that folder and rerun the step"
        if not isinstance(self.stage, str) or not STAGE_NAME.fullmatch(self.stage):
            raise ManifestError(f"{source}: stage {self.stage!r} is not a stage name; {fix}")
        if not isinstance(self.key, str) or not STAGE_KEY.fullmatch(self.key):
            raise ManifestError(f"{source}: key {self.key!r} is not a stage key (20 hex digits); {fix}")
        for name, record in self.outputs.items():
            try:
                relative_name(name, f"{source}: output", fix)
            except StorageError as err:
                raise ManifestError(str(err)) from None
            if record.path != f"{self.folder}/{name}":
                raise ManifestError(f"{source}: output {name!r} points at {record.path!r}, outside the step's folder {self.folder}; {fix}")


def stage_folder(stage: str, key: str) -> str:
    return f"{stage}/{key}"


def write_manifest(store: Store, manifest: Manifest) -> FileRecord:
    return store.write_bytes(f"{manifest.folder}/{MANIFEST_NAME}", manifest.to_json().encode())


def read_manifest(store: Store, stage: str, key: str) -> Manifest | None:
    """The complete manifest of `stage` at `key`, or None if the stage has not finished there."""
    relative = f"{stage_folder(stage, key)}/{MANIFEST_NAME}"
    if not store.exists(relative):
        return None
    manifest = Manifest.from_json(store.read_bytes(relative).decode(), source=store.url(relative))
    if (manifest.stage, manifest.key) != (stage, key):
        raise ManifestError(
            f"{store.url(relative)}: holds the manifest of {manifest.stage}/{manifest.key}, not of its folder {stage}/{key}; "
            "delete that folder and rerun the step"
        )
    return manifest


def manifest_url(store: Store, manifest: Manifest) -> str:
    """The URL that names a step's manifest between processes (Kubeflow steps, RayJobs)."""
    return store.url(f"{manifest.folder}/{MANIFEST_NAME}")


def read_manifest_url(store: Store, url: str, stages: Collection[str]) -> Manifest:
    """The manifest at `url`, which must be a step's manifest under `store`'s root: one of
    `stages` (the caller's: `kd_core.stage.STAGE_CODE_VERSIONS`) and a stage key (a URL from a
    pipeline parameter never reads outside the job's steps)."""
    root = store.url("").rstrip("/") + "/"
    suffix = "/" + MANIFEST_NAME
    parts = url[len(root) : -len(suffix)].split("/") if url.startswith(root) and url.endswith(suffix) else []
    if len(parts) != 2:
        raise ManifestError(f"{url}: not a step manifest under the job's storage root {root} (expected {root}<stage>/<key>{suffix})")
    stage, key = parts
    if stage not in stages or not STAGE_KEY.fullmatch(key):
        raise ManifestError(
            f"{url}: {stage}/{key} is not a step's folder (a stage of {', '.join(stages)} and a key of {KEY_LENGTH} hex "
            "digits); pass the manifest URL a kdflow step returned"
        )
    manifest = read_manifest(store, stage, key)
    if manifest is None:
        raise ManifestError(f"{url}: no such manifest; the step that writes it has not finished (or storage.root differs)")
    return manifest


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
