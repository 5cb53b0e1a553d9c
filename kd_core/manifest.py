"""Stage manifests: the JSON record that says a stage happened and what it produced.

A manifest is written last and atomically, so a stage without a complete manifest did not happen.
It records the stage, its key and config hash, the keys of its inputs, every output (URL, bytes,
sha256), metrics, timings and library versions; credentials written into a URL are masked.
Stage-specific facts that later stages need (e.g. which shard holds which split) go under `details`.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from kd_core.errors import InputError
from kd_core.redaction import redact_data
from kd_core.storage import FileRecord, Store

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
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
            return cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ManifestError(f"{source}: not a valid kdflow manifest ({err}); delete the folder and rerun the stage") from None


def stage_folder(stage: str, key: str) -> str:
    return f"{stage}/{key}"


def write_manifest(store: Store, manifest: Manifest) -> FileRecord:
    return store.write_bytes(f"{manifest.folder}/{MANIFEST_NAME}", manifest.to_json().encode())


def read_manifest(store: Store, stage: str, key: str) -> Manifest | None:
    """The complete manifest of `stage` at `key`, or None if the stage has not finished there."""
    relative = f"{stage_folder(stage, key)}/{MANIFEST_NAME}"
    if not store.exists(relative):
        return None
    return Manifest.from_json(store.read_bytes(relative).decode(), source=store.url(relative))


def manifest_url(store: Store, manifest: Manifest) -> str:
    """The URL that names a step's manifest between processes (Kubeflow steps, RayJobs)."""
    return store.url(f"{manifest.folder}/{MANIFEST_NAME}")


def read_manifest_url(store: Store, url: str) -> Manifest:
    """The manifest at `url`, which must be a step's manifest under `store`'s root."""
    root = store.url("").rstrip("/") + "/"
    suffix = "/" + MANIFEST_NAME
    parts = url[len(root) : -len(suffix)].split("/") if url.startswith(root) and url.endswith(suffix) else []
    if len(parts) != 2:
        raise ManifestError(f"{url}: not a step manifest under the job's storage root {root} (expected {root}<stage>/<key>{suffix})")
    manifest = read_manifest(store, *parts)
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
