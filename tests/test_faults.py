"""Transient faults cost nothing: a store that fails and stalls requests, an MLflow server that
goes away mid-run.

- The tiny job on S3 (moto on loopback) behind `FaultyProxy`, which answers a seeded share of
  requests 500/503 and holds others back, and at first refuses every write of the distill step's
  manifest: the step fails with its checkpoints kept; the rerun resumes from them and the job
  completes with the cache byte-identical and the metrics equal to a clean run's.
- MLflow stopped mid-run: training goes on, the log steps wait, and reach the restarted server.

Run: .venv/bin/python -m pytest tests/test_faults.py
"""

from __future__ import annotations

import json
import math

import pytest

from kd_core.job import validate_config
from kd_core.devtools import FaultyProxy, loopback_mlflow, migrated_sqlite_uri
from kd_core.pipeline import run_pipeline
from kd_core.storage import Store
from kd_core.train.tracking import MlflowLogger, TrainingRun

QUALITY = ("cross_entropy", "perplexity", "kl_to_teacher", "agreement_top1", "agreement_top5", "ece")


def output_hashes(manifest) -> dict[str, str]:
    return {name: record.sha256 for name, record in manifest.outputs.items()}


@pytest.mark.slow
def test_the_tiny_job_completes_through_a_faulty_store_with_the_same_bytes_and_metrics(tiny_config, s3_endpoint, s3_bucket, tmp_path):
    raw = tiny_config.model_dump(mode="json")
    raw["compute"]["backend"] = "local"
    raw["distill"]["checkpoint_every"] = 4  # checkpoints at steps 4 and 8 of 10
    clean = run_pipeline(validate_config(raw))

    with FaultyProxy(s3_endpoint, fail_share=0.04, delay_share=0.05, delay_s=0.05, seed=7,
                     fail_pattern=r"^PUT /[^?]*/distill/[0-9a-f]+/manifest\.json") as proxy:
        raw["storage"] = {"root": f"s3://{s3_bucket}/kdflow", "s3": {"endpoint_url": proxy.url, "max_attempts": 3, "retries": 2}}
        raw["registry"]["tracking_uri"] = migrated_sqlite_uri(tmp_path / "faulty-mlflow.db")
        faulty = validate_config(raw)
        store = Store(faulty.storage)
        with pytest.raises(OSError):  # the distill manifest cannot be written, whatever the retries
            run_pipeline(faulty)
        # The model was trained and saved, but the step is not done: its checkpoints stay.
        checkpoints = sorted(path.rsplit("/", 1)[-1] for path in store.fs.glob(store.path("distill/*/checkpoints/step-*")))
        assert checkpoints == ["step-00000004", "step-00000008"]
        assert not store.fs.glob(store.path("distill/*/manifest.json"))

        proxy.fail_pattern = None  # the store recovers; flaky as before
        steps = run_pipeline(faulty)
        counts = proxy.counts
    assert [name for name, manifest in steps.items() if manifest.reused] == ["prep", "teacher", "cache"]
    assert steps["distill"].metrics["resumed_from_step"] == 8 and not store.fs.glob(store.path("distill/*/checkpoints"))
    for stage in ("prep", "cache"):  # byte for byte what the clean run wrote
        assert output_hashes(steps[stage]) == output_hashes(clean[stage]), stage
    for model in ("teacher", "student", "baseline"):
        for name in QUALITY:
            assert steps["eval"].metrics[model][name] == pytest.approx(clean["eval"].metrics[model][name], rel=1e-5), (model, name)
    print(json.dumps({"requests": counts.requests, "failed": counts.failed, "delayed": counts.delayed,
                      "delay_seconds": round(counts.delay_seconds, 1), "by_method": counts.by_method}))
    assert counts.failed > 20 and counts.delayed > 20  # the faults did happen, and were ridden out


@pytest.mark.slow
def test_mlflow_going_away_mid_run_never_fails_training_and_loses_no_step(tmp_path, tiny_config, monkeypatch):
    from mlflow import MlflowClient

    from kd_core.devtools import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client fails at once: the logger's own retry is tested
    port, folder = free_port(), tmp_path / "mlflow"
    with loopback_mlflow(folder, port=port) as url:
        registry = tiny_config.registry.model_copy(update={"tracking_uri": url, "experiment": "outage"})
        logger = MlflowLogger(TrainingRun.for_job(registry, "outage", {"distill.train.max_steps": 9}), retry_every_s=0.0)
        logger.start()
        for step in (1, 2, 3):
            logger.log(step, {"step": step, "loss": 1.0 / step})
    # The server is gone: logging neither raises nor stalls training for long.
    for step in (4, 5, 6):
        logger.log(step, {"step": step, "loss": math.nan if step == 5 else 1.0 / step})
    assert [step for step, _ in logger.pending] == [4, 5, 6]
    with loopback_mlflow(folder, port=port) as url:  # back, same database
        for step in (7, 8, 9):
            logger.log(step, {"step": step, "loss": 1.0 / step})
        logger.end()
        client = MlflowClient(url)
        history = sorted((point.step, point.value) for point in client.get_metric_history(logger.run_id, "loss"))
        assert [step for step, _ in history] == list(range(1, 10)) and math.isnan(dict(history)[5])
        run = client.get_run(logger.run_id)
        assert run.info.status == "FINISHED" and run.data.params["distill.train.max_steps"] == "9"
    assert not logger.pending


@pytest.mark.slow
def test_a_shard_read_rides_out_transient_errors_the_client_gave_up_on(s3_endpoint, s3_bucket):
    from kd_core.config import StorageConfig
    from kd_core.data.shards import ShardError, read_verified

    with FaultyProxy(s3_endpoint, fail_pattern=r"^GET /[^?]*shards/0\.arrow", fail_times=3) as proxy:
        # One attempt per request in the client: each injected 5xx reaches kdflow's own retry.
        store = Store(StorageConfig(root=f"s3://{s3_bucket}/r", s3={"endpoint_url": proxy.url, "max_attempts": 1, "retries": 1}))
        record = store.write_bytes("shards/0.arrow", b"rows" * 1000)
        assert read_verified(store, record) == b"rows" * 1000 and proxy.fail_times == 0 and proxy.counts.failed == 3
        proxy.fail_times = None  # failing for good: the error comes through once the retries are spent
        with pytest.raises(OSError) as raised:
            read_verified(store, record)
        assert not isinstance(raised.value, ShardError)  # a store that keeps failing is not a corrupt shard
