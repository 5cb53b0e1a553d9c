"""End to end: the tiny job through all five stages, on real Ray and real storage backends.

- Ray backend, local folder storage, MLflow on SQLite: every stage runs, the student is registered
  under its alias; a second run reuses everything; forcing `distill` redoes exactly what reads it.
- Local backend, storage on a real S3 API (moto server on loopback) through s3fs; then a second
  job that uses the first job's teacher straight from S3 via `teacher.path`.

These take a few minutes (Ray Train start-up dominates). Run: .venv/bin/python -m pytest tests/test_end_to_end.py
"""

from __future__ import annotations

import json

import pytest

from kd_core.job import validate_config
from kd_core.pipeline import run_pipeline

ALL_STEPS = ["prep", "teacher", "cache", "distill", "baseline", "eval", "register"]


def registered_versions(tracking_uri: str, model_name: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return client, client.search_model_versions(f"name = '{model_name}'")


def assert_complete_run(steps, config):
    assert list(steps) == ALL_STEPS
    evaluation = steps["eval"].metrics
    for model in ("teacher", "student", "baseline"):
        assert evaluation[model]["perplexity"] > 1 and evaluation[model]["parameters"] > 0
    assert evaluation["teacher"]["parameters"] > evaluation["student"]["parameters"]
    assert 0 <= evaluation["student"]["agreement_top1"] <= evaluation["student"]["agreement_top5"] <= 1
    assert evaluation["teacher"]["kl_to_teacher"] == pytest.approx(0, abs=1e-5) and evaluation["teacher"]["agreement_top1"] == 1
    assert evaluation["student"]["kl_to_teacher"] > 0 and 0 <= evaluation["student"]["ece"] <= 1
    assert all(evaluation[model]["tokens_per_s"] > 0 and evaluation[model]["latency_ms"] > 0 for model in ("teacher", "student"))
    assert steps["cache"].details["layout"]["slots"] == config.cache.top_k
    assert len(steps["cache"].details["shards"]) == len(steps["prep"].details["splits"]["train"]["shards"])
    assert "model/model.safetensors" in steps["distill"].outputs
    assert "model/tokenizer.json" in steps["distill"].outputs


@pytest.mark.slow
def test_tiny_job_on_ray_registers_reuses_and_forces(tiny_config):
    steps = run_pipeline(tiny_config)
    assert_complete_run(steps, tiny_config)
    assert not any(manifest.reused for manifest in steps.values())
    # No eval.gates: the default sanity gates, against the uniform predictor (perplexity = the
    # vocabulary size) and the baseline, which a trained student passes.
    evaluation = steps["eval"].metrics
    assert evaluation["uniform"]["perplexity"] == steps["prep"].details["vocab_size"] and evaluation["gates_default"] is True
    assert [gate["gate"] for gate in evaluation["gates"]] == ["student.perplexity < 0.99 * uniform.perplexity", "student.perplexity < baseline.perplexity"]
    assert evaluation["gates_passed"] is True

    client, versions = registered_versions(tiny_config.registry.tracking_uri, tiny_config.registry.model_name)
    assert len(versions) == 1
    alias_version = client.get_model_version_by_alias(tiny_config.registry.model_name, "challenger")
    assert alias_version.version == versions[0].version
    assert alias_version.tags["kdflow.student_key"] == steps["distill"].key
    assert alias_version.tags["kdflow.teacher_key"] == steps["teacher"].key
    assert steps["eval"].outputs["training_curves.png"].bytes > 10_000
    artifacts = {item.path for item in client.list_artifacts(alias_version.run_id, "eval")}
    assert artifacts == {"eval/metrics.json", "eval/training_curves.png", "eval/report.html", "eval/gates.json"}
    run = client.get_run(alias_version.run_id)
    assert float(run.data.metrics["student.perplexity"]) == pytest.approx(steps["eval"].metrics["student"]["perplexity"])
    assert run.data.params["distill.loss.temperature"] == str(tiny_config.distill.loss.temperature)

    # Rank 0 of the distillation logged its own MLflow run: the config, then every log step.
    training = client.get_run(steps["distill"].details["mlflow_run_id"])
    assert training.info.status == "FINISHED" and training.data.params["distill.deepspeed.zero_stage"] == "2"
    log_steps = len(range(0, tiny_config.distill.train.max_steps, tiny_config.distill.train.log_every)) + 1
    for metric in ("loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s", "samples_seen"):
        assert len(client.get_metric_history(training.info.run_id, metric)) == log_steps, metric
    samples = client.get_metric_history(training.info.run_id, "samples_seen")
    assert samples[-1].value == tiny_config.distill.train.max_steps * tiny_config.distill.train.batch_size

    again = run_pipeline(tiny_config)
    assert all(manifest.reused for manifest in again.values())
    assert len(registered_versions(tiny_config.registry.tracking_uri, tiny_config.registry.model_name)[1]) == 1

    forced = run_pipeline(tiny_config, force=frozenset({"distill"}))
    reran = {step for step, manifest in forced.items() if not manifest.reused}
    assert reran == {"distill", "eval", "register"}
    quality = ("cross_entropy", "perplexity", "kl_to_teacher", "agreement_top1", "agreement_top5", "ece", "calibration")
    for model in ("teacher", "student", "baseline"):  # seeded training reproduces the student exactly
        assert {name: forced["eval"].metrics[model][name] for name in quality} == {name: steps["eval"].metrics[model][name] for name in quality}
    assert len(registered_versions(tiny_config.registry.tracking_uri, tiny_config.registry.model_name)[1]) == 2
    # Both versions passed the sanity gates and are eligible; the second only ties the first, so the
    # champion stays on version 1 while the challenger alias moves to version 2.
    assert (forced["register"].details["version"], forced["register"].details["champion"]) == (2, 1)
    assert str(client.get_model_version_by_alias(tiny_config.registry.model_name, "champion").version) == "1"


@pytest.mark.slow
def test_tiny_job_on_s3_storage_and_existing_teacher(tiny_config, s3_endpoint, s3_bucket, tmp_path):
    import s3fs

    raw = tiny_config.model_dump(mode="json")
    secret = "kdflow-config-secret-value"  # moto accepts any credentials; this one must never leak
    raw["storage"] = {
        "root": f"s3://{s3_bucket}/kdflow",
        "s3": {"endpoint_url": s3_endpoint, "access_key_id": "kdflow-config-key", "secret_access_key": secret},
    }
    raw["compute"]["backend"] = "local"
    raw["eval"]["gates"] = ["student.perplexity <= 1000 * teacher.perplexity", "agreement_top1 >= 1.5"]
    config = validate_config(raw)
    steps = run_pipeline(config)
    assert_complete_run(steps, config)
    # One gate passes, one cannot: the version is registered as challenger but never champion.
    gates = steps["eval"].metrics["gates"]
    assert [gate["passed"] for gate in gates] == [True, False] and steps["eval"].metrics["gates_passed"] is False
    assert gates[1]["left"] == steps["eval"].metrics["student"]["agreement_top1"] and gates[1]["right"] == 1.5
    assert steps["register"].details["gates_passed"] is False and steps["register"].details["champion"] is None

    bucket = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    for step in ALL_STEPS:
        text = bucket.cat_file(f"{s3_bucket}/kdflow/{step}/{steps[step].key}/manifest.json").decode()
        assert secret not in text and "kdflow-config-key" not in text
        manifest = json.loads(text)
        assert manifest["key"] == steps[step].key
        for record in manifest["outputs"].values():
            assert record["url"].startswith(f"s3://{s3_bucket}/kdflow/")
            assert bucket.info(record["url"])["size"] == record["bytes"]

    client, versions = registered_versions(config.registry.tracking_uri, config.registry.model_name)
    params = client.get_run(versions[0].run_id).data.params
    assert params["storage.root"] == f"s3://{s3_bucket}/kdflow"
    assert not any(secret in value or "kdflow-config-key" in value for value in params.values())
    training_params = client.get_run(steps["distill"].details["mlflow_run_id"]).data.params
    assert training_params["storage.root"] == f"s3://{s3_bucket}/kdflow"
    assert not any(secret in value or "kdflow-config-key" in value for value in training_params.values())

    teacher_url = f"s3://{s3_bucket}/kdflow/{steps['teacher'].details['model_folder']}"
    raw["teacher"]["path"] = teacher_url
    with_existing = run_pipeline(validate_config(raw))
    # teacher.path alone: prep tokenizes with the teacher's own tokenizer (here the one the first
    # job trained), a new prep key that makes the very same shards.
    assert with_existing["prep"].config["data"]["tokenizer"] == teacher_url and not with_existing["prep"].reused
    shard_hashes = [{n: r.sha256 for n, r in job["prep"].outputs.items() if n.startswith("shards/")} for job in (steps, with_existing)]
    assert shard_hashes[0] == shard_hashes[1]
    assert with_existing["teacher"].details["external_url"] == teacher_url
    # The same weights teach the same student: the evaluation matches the first job's.
    quality = ("cross_entropy", "perplexity", "kl_to_teacher", "agreement_top1", "agreement_top5", "ece", "parameters")
    for name in quality:
        assert with_existing["eval"].metrics["student"][name] == pytest.approx(steps["eval"].metrics["student"][name]), name
