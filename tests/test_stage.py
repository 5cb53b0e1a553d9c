"""The stage contract: keys, manifests, skipping and forcing.

Uses the real prep stage on a handful of JSONL documents, so each run takes about a second.
Run: .venv/bin/python -m pytest tests/test_stage.py
"""

from __future__ import annotations

import hashlib
import json

import pytest

from kd_core.config import DataConfig, StorageConfig
from kd_core.stages.prep import prep, prep_section
from kd_core.manifest import ManifestError, read_manifest
from kd_core.pipeline import is_forced
from kd_core.stage import StageRun
from kd_core.storage import Store
from kd_core.tasks import task_named

WORDS = "teacher student logits cache shard manifest tokens distill temperature entropy".split()


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(60))}) for i in range(40)]
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture
def store(tmp_path):
    return Store(StorageConfig(root=str(tmp_path / "store")))


def data_config(corpus: str, **changes) -> DataConfig:
    settings = {"source": "files", "files": [corpus], "vocab_size": 300, "seq_len": 16, "rows_per_shard": 8}
    return DataConfig(**{**settings, **changes})


def test_same_config_same_key_and_reused(corpus, store):
    first = prep(data_config(corpus), store)
    second = prep(data_config(corpus), store)
    assert not first.reused and second.reused
    assert second.key == first.key
    assert second.created_at == first.created_at


def test_changed_config_gets_a_new_key(corpus, store):
    assert prep(data_config(corpus), store).key != prep(data_config(corpus, seq_len=32), store).key


def test_force_reruns_in_place(corpus, store):
    first = prep(data_config(corpus), store)
    forced = prep(data_config(corpus), store, force=True)
    assert not forced.reused and forced.key == first.key
    assert read_manifest(store, "prep", first.key).outputs == forced.outputs  # deterministic outputs


def test_manifest_records_every_output_with_true_size_and_hash(corpus, store):
    manifest = prep(data_config(corpus), store)
    assert manifest.stage == "prep" and manifest.inputs == {}
    assert {"torch", "pyarrow", "python"} <= set(manifest.versions)
    assert "tokenizer/tokenizer.json" in manifest.outputs
    assert any(name.startswith("shards/train-") for name in manifest.outputs)
    for name, record in manifest.outputs.items():
        data = store.read_bytes(record.path)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (record.bytes, record.sha256), name
    assert manifest.metrics["train_tokens"] == manifest.details["splits"]["train"]["tokens"] > 0
    assert manifest.timings["total"] > 0


def test_stage_without_manifest_did_not_happen(corpus, store):
    manifest = prep(data_config(corpus), store)
    store.delete(f"{manifest.folder}/manifest.json")
    again = prep(data_config(corpus), store)
    assert not again.reused


def test_forcing_deletes_the_old_manifest_before_work(corpus, store):
    manifest = prep(data_config(corpus), store)
    run = StageRun(store, "prep", prep_section(task_named("causal_lm"), data_config(corpus), store.config), inputs={}, force=True)
    assert run.key == manifest.key
    assert read_manifest(store, "prep", manifest.key) is None  # a crash from here on leaves it incomplete


def test_input_keys_change_downstream_keys(corpus, store):
    upstream_a = prep(data_config(corpus), store)
    upstream_b = prep(data_config(corpus, seed=1), store)
    config = {"anything": 1}
    key_a = StageRun(store, "eval", config, inputs={"prep": upstream_a}).key
    key_b = StageRun(store, "eval", config, inputs={"prep": upstream_b}).key
    assert key_a != key_b


def test_corrupt_manifest_is_a_named_error(corpus, store):
    manifest = prep(data_config(corpus), store)
    store.write_bytes(f"{manifest.folder}/manifest.json", b"{not json")
    with pytest.raises(ManifestError, match=f"prep/{manifest.key}/manifest.json"):
        prep(data_config(corpus), store)


def test_forcing_a_step_forces_what_reads_it():
    assert is_forced("eval", frozenset({"distill"}))
    assert is_forced("register", frozenset({"teacher"}))
    assert not is_forced("baseline", frozenset({"distill"}))
    assert not is_forced("prep", frozenset({"cache"}))
    assert all(is_forced(step, frozenset({"all"})) for step in ("prep", "baseline", "register"))


# ------------------------------------------------------------------------------------- the lease
HOLD_LEASE = """
import sys, time
from kd_core.config import StorageConfig
from kd_core.storage import Store
from kd_core.stage import StageLease
store = Store(StorageConfig(root=sys.argv[1]))
with StageLease(store, "distill", "distill/k1", ttl_s=30, wait_s=0):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    store.write_bytes("distill/k1/manifest.json", b"{}")  # the step commits, then lets go
"""


def hold_lease(root, seconds: float):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, str(root), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_a_second_run_of_a_step_waits_for_the_first_then_reuses_its_result(tmp_path):
    from kd_core.stage import StageBusy, StageLease

    store = Store(StorageConfig(root=str(tmp_path)))
    holder = hold_lease(tmp_path, 4)
    try:
        with pytest.raises(StageBusy, match=r"distill step distill/k1: held by .*:\d+:\w+ \(host:pid:id\), since .*compute.lease_wait_s = 0 s"):
            StageLease(store, "distill", "distill/k1", ttl_s=30, wait_s=0).__enter__()
        with StageLease(store, "distill", "distill/k1", ttl_s=30, wait_s=60, poll_s=0.2) as lease:
            assert lease.finished_elsewhere  # waited, then found the first run's manifest
    finally:
        holder.wait(timeout=30)
    assert holder.returncode == 0 and not store.exists("distill/k1/LEASE.json")


def test_the_lease_of_a_killed_run_is_taken_over_and_a_stale_one_expires(tmp_path):
    from kd_core.stage import LEASE_NAME, StageLease

    store = Store(StorageConfig(root=str(tmp_path)))
    holder = hold_lease(tmp_path, 300)
    holder.kill()  # SIGKILL: no chance to let go
    holder.wait()
    with StageLease(store, "distill", "distill/k1", ttl_s=30, wait_s=0) as lease:  # its process is gone
        assert not lease.finished_elsewhere and json.loads(store.read_bytes(f"distill/k1/{LEASE_NAME}"))["holder"] == lease.holder
    # A holder on another machine that stopped renewing 40 s ago, past its 30 s ttl.
    store.write_bytes(f"distill/k2/{LEASE_NAME}", json.dumps({"holder": "node-7:12:ab", "since": "-", "renewed": 0, "ttl_s": 30}).encode())
    with StageLease(store, "distill", "distill/k2", ttl_s=30, wait_s=0):
        pass
    assert not store.exists(f"distill/k2/{LEASE_NAME}")


def test_a_conditional_create_on_s3_lets_exactly_one_writer_win(s3_endpoint, s3_bucket):
    from concurrent.futures import ThreadPoolExecutor

    store = Store(StorageConfig(root=f"s3://{s3_bucket}/leases", s3={"endpoint_url": s3_endpoint}))
    with ThreadPoolExecutor(4) as pool:
        won = list(pool.map(lambda n: store.create_exclusive("distill/k/LEASE.json", str(n).encode()), range(8)))
    assert won.count(True) == 1 and store.read_bytes("distill/k/LEASE.json") == str(won.index(True)).encode()
