"""Names read from a manifest or a store listing never become paths outside their folder.

A manifest's outputs, a pipeline parameter's manifest URL and a store listing's object names are
input: each is refused, with one line naming it, when it is absolute, contains `..` or (after
resolving symbolic links) lands outside its folder. Local and memory:// stores, no services.

Run: .venv/bin/python -m pytest tests/test_untrusted_names.py
"""

from __future__ import annotations

import json
import uuid

import pytest

from kd_core.config import StorageConfig
from kd_core.manifest import ManifestError, read_manifest, read_manifest_url
from kd_core.stage import STAGE_CODE_VERSIONS
from kd_core.storage import StorageError, Store, inside

KEY = "0123456789abcdef0123"


def manifest_json(stage: str, key: str, outputs: dict[str, str]) -> bytes:
    """A manifest as a stage writes it, with `outputs`: name -> path relative to the root."""
    records = {name: {"path": path, "url": path, "bytes": 1, "sha256": "0" * 64} for name, path in outputs.items()}
    return json.dumps(
        {"stage": stage, "key": key, "config_hash": "", "config": {}, "inputs": {}, "outputs": records, "schema_version": 1}
    ).encode()


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(StorageConfig(root=str(tmp_path / "store")))


def test_download_refuses_a_listed_name_that_leaves_the_folder(tmp_path):
    store = Store(StorageConfig(root=f"memory://kdflow-tests/{uuid.uuid4().hex}"))
    store.write_bytes("teacher/k/model/config.json", b"{}")
    store.fs.pipe_file(store.path("teacher/k/model/../../../escaped.txt"), b"planted by whoever can write the bucket")
    target = tmp_path / "node" / "deep" / "teacher"
    with pytest.raises(StorageError, match=r"teacher/k/model: '\.\./\.\./\.\./escaped\.txt' is not a name inside its folder"):
        store.download_dir("teacher/k/model", target)
    assert not list((tmp_path / "node").rglob("escaped.txt"))
    assert not target.exists()


def test_a_manifest_whose_outputs_leave_the_step_folder_is_refused(store):
    folder = f"eval/{KEY}"
    store.write_bytes(f"{folder}/manifest.json", manifest_json("eval", KEY, {"../../../../escape.html": "escape.html"}))
    with pytest.raises(ManifestError, match=r"output: '\.\./\.\./\.\./\.\./escape\.html' is not a name inside its folder"):
        read_manifest(store, "eval", KEY)
    # A plain name whose record points at another step's files is refused too.
    store.write_bytes(f"{folder}/manifest.json", manifest_json("eval", KEY, {"report.html": "prep/other/tokenizer.json"}))
    with pytest.raises(ManifestError, match=r"output 'report\.html' points at 'prep/other/tokenizer\.json', outside the step's folder"):
        read_manifest_url(store, store.url(f"{folder}/manifest.json"), STAGE_CODE_VERSIONS)


def test_read_manifest_url_takes_only_a_known_stage_and_a_stage_key(store):
    # A manifest-shaped file where no stage writes: a pipeline parameter must not reach it.
    store.write_bytes(f"secrets/{KEY}/manifest.json", manifest_json("secrets", KEY, {}))
    with pytest.raises(ManifestError, match=r"secrets/0123456789abcdef0123 is not a step's folder"):
        read_manifest_url(store, store.url(f"secrets/{KEY}/manifest.json"), STAGE_CODE_VERSIONS)
    store.write_bytes("prep/not-a-key/manifest.json", manifest_json("prep", "not-a-key", {}))
    with pytest.raises(ManifestError, match=r"prep/not-a-key is not a step's folder"):
        read_manifest_url(store, store.url("prep/not-a-key/manifest.json"), STAGE_CODE_VERSIONS)


def test_containment_is_checked_after_resolving_links(tmp_path):
    folder, outside = tmp_path / "folder", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "link").symlink_to(outside)
    assert inside(folder, "sub/metrics.json", "eval output", "rerun eval") == (folder / "sub" / "metrics.json").resolve()
    with pytest.raises(StorageError, match=r"eval output: 'link/metrics\.json' resolves to .*outside/metrics\.json, outside .*folder; rerun eval"):
        inside(folder, "link/metrics.json", "eval output", "rerun eval")
    for name in ("/etc/passwd", "a/../../b", ""):
        with pytest.raises(StorageError, match="is not a name inside its folder"):
            inside(folder, name, "eval output", "rerun eval")
