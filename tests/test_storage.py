"""Storage: atomic writes on local disk, memory:// and a real S3 API (moto server on loopback).

A write that fails midway must leave neither a partial file nor a temporary one, and must not
disturb the previous version of the file. Run: .venv/bin/python -m pytest tests/test_storage.py
"""

from __future__ import annotations

import hashlib
import uuid

import pytest

from kd_core.config import S3Config, StorageConfig
from kd_core.storage import Store


class Boom(RuntimeError):
    pass


def fail_midway(store: Store, relative: str) -> None:
    with pytest.raises(Boom):
        with store.atomic_open(relative) as handle:
            handle.write(b"half of the new conte")
            raise Boom()


def local_store(tmp_path) -> Store:
    return Store(StorageConfig(root=str(tmp_path / "root")))


def memory_store() -> Store:
    return Store(StorageConfig(root=f"memory://kdflow-tests/{uuid.uuid4().hex}"))


def s3_store(endpoint: str, bucket: str, with_config_credentials: bool = False) -> Store:
    credentials = {"access_key_id": "kdflow-test-key", "secret_access_key": "kdflow-test-secret"} if with_config_credentials else {}
    return Store(StorageConfig(root=f"s3://{bucket}/jobs", s3=S3Config(endpoint_url=endpoint, **credentials)))


@pytest.fixture(params=["local", "file-url", "memory", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return local_store(tmp_path)
    if request.param == "file-url":
        return Store(StorageConfig(root=f"file://{tmp_path}/root"))
    if request.param == "memory":
        return memory_store()
    return s3_store(request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket"))


def test_write_read_roundtrip_with_checksum(any_store):
    record = any_store.write_bytes("a/b/data.bin", b"kdflow" * 1000)
    assert any_store.read_bytes("a/b/data.bin") == b"kdflow" * 1000
    assert record.bytes == 6000
    assert record.sha256 == hashlib.sha256(b"kdflow" * 1000).hexdigest()
    assert record.url.endswith("a/b/data.bin")


def test_failed_write_leaves_nothing(any_store):
    fail_midway(any_store, "x/new.bin")
    assert not any_store.exists("x/new.bin")
    assert not any_store.fs.exists(any_store.path("x")) or any_store.fs.ls(any_store.path("x")) == []


def test_failed_overwrite_keeps_previous_version(any_store):
    any_store.write_bytes("x/file.bin", b"version one")
    fail_midway(any_store, "x/file.bin")
    assert any_store.read_bytes("x/file.bin") == b"version one"
    assert [name.rsplit("/", 1)[-1] for name in any_store.fs.ls(any_store.path("x"), detail=False)] == ["file.bin"]


def test_directory_upload_and_download(any_store, tmp_path):
    source = tmp_path / "model"
    (source / "nested").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "nested" / "weights.safetensors").write_bytes(b"\0" * 4096)
    records = any_store.upload_dir(source, "stage/key/model")
    assert sorted(r.path for r in records) == ["stage/key/model/config.json", "stage/key/model/nested/weights.safetensors"]
    local = any_store.download_dir("stage/key/model", tmp_path / "copy")
    assert (local / "nested" / "weights.safetensors").read_bytes() == b"\0" * 4096


def test_local_root_is_made_absolute_for_worker_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = Store(StorageConfig(root="relative/root"))
    assert store.config.root == str(tmp_path / "relative" / "root")


def test_s3_urls_and_config_carry_no_credentials(s3_endpoint, s3_bucket):
    store = s3_store(s3_endpoint, s3_bucket, with_config_credentials=True)
    record = store.write_bytes("k/v.json", b"{}")
    assert record.url == f"s3://{s3_bucket}/jobs/k/v.json"
    for text in (record.url, repr(store), repr(store.config), store.config.model_dump_json()):
        assert "kdflow-test-secret" not in text


def test_s3_writes_are_visible_to_a_separate_client(s3_endpoint, s3_bucket):
    import s3fs

    s3_store(s3_endpoint, s3_bucket).write_bytes("shared/one.txt", b"hello")
    reader = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    assert reader.cat_file(f"{s3_bucket}/jobs/shared/one.txt") == b"hello"
