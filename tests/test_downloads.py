"""Model folders downloaded from S3 (moto server on loopback) by several processes of one node.

`Store.download_dir` and `teacher_model_dir` fetch into a private temporary folder under one file
lock per target, check what they fetched, write a completion marker last and rename the folder
into place. Checked here with real processes: four load the same teacher at once and the one
downloading is killed with SIGKILL (once part of the weights is in its temporary folder); the others end with the
complete folder, and a later load neither reuses a partial folder nor refetches a complete one.

Run: .venv/bin/python -m pytest tests/test_downloads.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd_core.config import S3Config, StorageConfig
from kd_core.manifest import Manifest
from kd_core.storage import DOWNLOAD_MARKER, StorageError, Store

REPO = Path(__file__).resolve().parents[1]
MODEL = "teacher/0123456789abcdef0123/model"
LOADER = """
import sys
from pathlib import Path
from kd_core.config import S3Config, StorageConfig
from kd_core.storage import Store
store = Store(StorageConfig(root=sys.argv[1], s3=S3Config(endpoint_url=sys.argv[2])))
print(store.download_dir(sys.argv[3], Path(sys.argv[4])))
"""
"""One process loading the teacher folder: what a cache actor or a training rank does first."""


def teacher_files() -> dict[str, bytes]:
    """A small teacher folder: a few MB of weights (enough that a download takes a while on
    loopback), its config and tokenizer."""
    weights = os.urandom(12 * 2**20)
    return {"model.safetensors": weights, "config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"version": "1.0"}'}


@pytest.fixture
def s3_teacher(s3_endpoint, s3_bucket, tmp_path):
    """(store, files) with the teacher folder written to the store under MODEL."""
    store = Store(StorageConfig(root=f"s3://{s3_bucket}/jobs", s3=S3Config(endpoint_url=s3_endpoint)))
    files = teacher_files()
    source = tmp_path / "source"
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    store.upload_dir(source, MODEL)
    return store, files


def assert_complete(folder: Path, files: dict[str, bytes]) -> None:
    assert {path.name for path in folder.iterdir()} == {*files, DOWNLOAD_MARKER}
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name


def downloading(target: Path) -> Path | None:
    """A temporary folder beside `target` holding part of the weights (over 64 KiB), if any."""
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        try:
            if sum(path.stat().st_size for path in partial.rglob("*") if path.is_file()) > 64 * 2**10:
                return partial
        except FileNotFoundError:  # renamed into place meanwhile
            continue
    return None


def leftovers(target: Path) -> list[str]:
    return sorted(path.name for path in target.parent.iterdir() if path.name.startswith(f".{target.name}."))


@pytest.mark.slow
def test_concurrent_loads_survive_a_killed_download_and_never_reuse_a_partial_folder(s3_teacher, s3_endpoint, tmp_path):
    store, files = s3_teacher
    target = tmp_path / "node-cache" / "teacher"
    command = [sys.executable, "-c", LOADER, store.config.root, s3_endpoint, MODEL, str(target)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    loaders = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        deadline = time.monotonic() + 60
        while not (partial := downloading(target)):
            assert time.monotonic() < deadline, "no loader downloaded into a temporary folder beside the target"
            assert all(loader.poll() is None for loader in loaders), "a loader finished without a temporary folder"
            time.sleep(0.002)
        victim = int(partial.name.split(".partial-")[1].split("-")[0])
        os.kill(victim, signal.SIGKILL)
        outcomes = {loader.pid: (loader.wait(timeout=120), loader.stdout.read(), loader.stderr.read()) for loader in loaders}
    finally:
        for loader in loaders:
            if loader.poll() is None:
                loader.kill()
    assert outcomes.pop(victim)[0] == -signal.SIGKILL
    for code, out, err in outcomes.values():
        assert code == 0, err
        assert out.strip() == str(target)
    assert_complete(target, files)
    assert leftovers(target) == []  # the killed loader's temporary folder was cleared by the next one

    # A complete folder is reused as it is (same inode: not fetched again) ...
    weights = target / "model.safetensors"
    inode = weights.stat().st_ino
    assert store.download_dir(MODEL, target) == target and weights.stat().st_ino == inode
    # ... a damaged one (a file cut short) is fetched again, and so is a folder without the marker.
    weights.write_bytes(files["model.safetensors"][:1000])
    store.download_dir(MODEL, target)
    assert_complete(target, files)
    (target / DOWNLOAD_MARKER).unlink()
    (target / "config.json").write_bytes(b"{}")
    store.download_dir(MODEL, target)
    assert_complete(target, files)


def test_external_teacher_partial_folder_is_not_reused_and_a_changed_teacher_is_refused(s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    """A folder left by a download that died (here: only config.json) is completed, not loaded;
    a teacher folder changed after the teacher step recorded it is refused, not loaded."""
    import kd_core.models.teacher as teacher_module
    from kd_core.storage import url_to_fs

    store = Store(StorageConfig(root=f"s3://{s3_bucket}/jobs", s3=S3Config(endpoint_url=s3_endpoint)))
    files = teacher_files()
    url = f"s3://{s3_bucket}/external-teacher"
    for name, data in files.items():
        store.fs.pipe_file(f"{s3_bucket}/external-teacher/{name}", data)
    fs, root = url_to_fs(url, store.config)
    recorded = {"path": url, "weights_identity": teacher_module.weights_identity(fs, root, fs.find(root, detail=True))}
    key = "abcdef0123456789abcd"
    manifest = Manifest("teacher", key, "", recorded, {}, {}, details={"external_url": url})
    monkeypatch.setattr(teacher_module, "CACHE_ROOT", tmp_path / "cache")
    partial = tmp_path / "cache" / "teachers" / key
    partial.mkdir(parents=True)
    (partial / "config.json").write_bytes(files["config.json"])

    folder = teacher_module.teacher_model_dir(store, manifest)
    assert_complete(folder, files)

    store.fs.pipe_file(f"{s3_bucket}/external-teacher/tokenizer.json", b'{"version": "2.0"}')
    with pytest.raises(teacher_module.TeacherError, match=r"teacher.path: s3://.*/external-teacher changed after the teacher step abcdef"):
        teacher_module.teacher_model_dir(store, manifest)


def test_a_store_model_is_checked_against_its_manifest(s3_teacher, tmp_path, monkeypatch):
    """The trained teacher's bytes changed in the store after its step wrote them (same size):
    the download names the file and refuses it instead of loading other weights."""
    import kd_core.models as models

    store, files = s3_teacher
    records = {f"model/{name}": store.upload_file(tmp_path / "source" / name, f"{MODEL}/{name}") for name in files}
    manifest = Manifest("teacher", "0123456789abcdef0123", "", {}, {}, records, details={"model_folder": MODEL})
    monkeypatch.setattr(models, "CACHE_ROOT", tmp_path / "cache")
    store.fs.pipe_file(store.path(f"{MODEL}/tokenizer.json"), b'{"version": "6.6"}')
    with pytest.raises(StorageError, match=r"tokenizer\.json: sha256 .* differs from the recorded"):
        models.model_copy(store, manifest)
    assert not any((tmp_path / "cache").rglob("*.json")), "nothing of the refused download is left"

    store.upload_file(tmp_path / "source" / "tokenizer.json", f"{MODEL}/tokenizer.json")
    assert_complete(models.model_copy(store, manifest), files)
