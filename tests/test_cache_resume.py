"""The cache stage as operators meet it: killed with SIGKILL mid-job, run twice at once, on S3.

`kdflow cache` runs as a subprocess (the installed entry point, `compute.backend=local` so no Ray
start dominates), on small shards and one-row teacher batches so that the job is still writing
when it is killed. The reference is an uninterrupted run of the same job.
Run: .venv/bin/python -m pytest tests/test_cache_resume.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd_core.train.inference import COMMIT_SUFFIX
from kd_core.stages.cache import cache
from kd_core.cache import cache_shards
from kd_core.cache.format import CacheLayout
from kd_core.job import load_config
from kd_core.stages.prep import prep
from kd_core.data.shards import ShardError
from kd_core.data.stream import TrainingStream
from kd_core.manifest import Manifest
from kd_core.storage import Store
from kd_core.stages.teacher import teacher

REPO = Path(__file__).resolve().parents[1]
SLOW_CACHE = ["compute.backend=local", "data.rows_per_shard=8", "cache.batch_size=1", "cache.top_k=16"]


def kdflow_command(root: Path, *extra: str) -> list[str]:
    executable = shutil.which("kdflow", path=str(Path(sys.executable).parent)) or "kdflow"
    return [executable, "cache", "configs/tiny.yaml", f"storage.root={root}", *SLOW_CACHE, *extra]


def run_cache(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(kdflow_command(root), cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "KDFLOW_QUIET": "1"})


def cache_folder(root: Path) -> Path:
    folders = [path for path in (root / "cache").iterdir() if path.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((folder / "shards").glob("*.arrow"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Prepared data and teacher, and the bytes of an uninterrupted cache run over them."""
    root = tmp_path_factory.mktemp("resume")
    done = run_cache(root)
    assert done.returncode == 0, done.stderr
    folder = cache_folder(root)
    original = shard_bytes(folder)
    assert len(original) >= 20
    shutil.rmtree(folder)
    return root, folder, original


@pytest.mark.slow
def test_sigkilled_cache_job_resumes_to_a_byte_identical_cache(reference):
    root, folder, original = reference
    job = subprocess.Popen(kdflow_command(root), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "KDFLOW_QUIET": "1"})
    deadline = time.monotonic() + 300
    while not list(folder.glob(f"shards/*{COMMIT_SUFFIX}")):  # wait for the first committed shard
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.002)
    job.send_signal(signal.SIGKILL)
    job.wait()
    committed = len(list(folder.glob(f"shards/*{COMMIT_SUFFIX}")))
    assert not (folder / "manifest.json").exists()
    assert 1 <= committed < len(original)

    resumed = run_cache(root)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["shards_resumed"] >= committed - 1  # a shard caught mid-commit is redone
    assert shard_bytes(folder) == original


@pytest.mark.slow
def test_two_concurrent_writers_leave_one_valid_cache(reference):
    root, folder, original = reference
    env = {**os.environ, "KDFLOW_QUIET": "1"}
    jobs = [subprocess.Popen(kdflow_command(root), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for job in jobs:
        _, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, stderr
    assert shard_bytes(folder) == original
    manifest = Manifest.from_json((folder / "manifest.json").read_text(), str(folder))
    assert manifest.key == folder.name
    for name, data in original.items():
        assert manifest.output(f"shards/{name}").sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_cache_on_s3_writes_reads_resumes_and_names_a_corrupt_shard(tmp_path, s3_endpoint, s3_bucket):
    import s3fs

    config = load_config(
        REPO / "configs" / "tiny.yaml",
        [f"storage.root=s3://{s3_bucket}/job", f"storage.s3.endpoint_url={s3_endpoint}", "compute.backend=local"],
    )
    store = Store(config.storage)
    prepared = prep(config.data, store)
    taught = teacher(config.teacher, prepared, store, config.compute)
    complete = cache(config.cache, prepared, taught, store, config.compute)
    records = cache_shards(complete)
    original = {record.path: store.read_bytes(record.path) for record in records}
    s3 = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    assert s3.exists(f"{s3_bucket}/job/{records[0].path}")

    # Killed state on S3: no manifest, the last two shards never written.
    store.delete(f"{complete.folder}/manifest.json")
    for record in records[-2:]:
        store.delete(record.path)
        store.delete(record.path + COMMIT_SUFFIX)
    resumed = cache(config.cache, prepared, taught, store, config.compute)
    assert resumed.metrics["shards_resumed"] == len(records) - 2
    assert {record.path: store.read_bytes(record.path) for record in cache_shards(resumed)} == original

    layout = CacheLayout.from_dict(resumed.details["layout"])
    token_shards = [prepared.output(name) for name in prepared.details["splits"]["train"]["shards"]]
    stream = TrainingStream(store.config, token_shards, cache_shards=cache_shards(resumed), cache_layout=layout, epochs=1)
    assert sum(1 for _ in stream) == prepared.details["splits"]["train"]["rows"]

    damaged = bytearray(original[records[3].path])
    damaged[-10] ^= 0x01
    store.write_bytes(records[3].path, bytes(damaged))
    with pytest.raises(ShardError, match=rf"s3://{s3_bucket}/job/{records[3].path} is corrupt"):
        list(TrainingStream(store.config, token_shards, cache_shards=cache_shards(resumed), cache_layout=layout, epochs=1))
