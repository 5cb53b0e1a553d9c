"""The register stage: log the student to MLflow and register it as a new model version.

One MLflow run per registration holds the job's public config as params (no secrets), the eval
metrics, the eval stage's files (`eval/metrics.json`, `eval/training_curves.png`), and the student's Hugging Face directory (safetensors + tokenizer) as the `model`
artifact. A new version of `registry.model_name` is created from that artifact, tagged with the
teacher, data and config keys and the code version, and `registry.alias` is pointed at it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from kd_core import __version__
from kd_core.config import RegistryConfig, flatten
from kd_core.manifest import Manifest
from kd_core.models import local_copy
from kd_core.stage import StageRun
from kd_core.storage import Store

_MAX_PARAM_LENGTH = 500


def register(
    config: RegistryConfig,
    eval_manifest: Manifest,
    student: Manifest,
    store: Store,
    job_params: dict,
    *,
    force: bool = False,
) -> Manifest:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run = StageRun(store, "register", config, inputs={"eval": eval_manifest, "student": student}, force=force)
    if run.reused:
        return run.reused
    mlflow.set_tracking_uri(config.tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id(config), run_name=f"register-{student.key[:8]}") as mlflow_run:
        mlflow.log_params({key: str(value)[:_MAX_PARAM_LENGTH] for key, value in flatten(job_params).items()})
        mlflow.log_metrics(_numeric(flatten(eval_manifest.metrics)))
        with tempfile.TemporaryDirectory() as folder:
            for name, record in eval_manifest.outputs.items():
                (Path(folder) / name).write_bytes(store.read_bytes(record.path))
            mlflow.log_artifacts(folder, artifact_path="eval")
        mlflow.log_artifacts(str(local_copy(store, student.details["model_folder"])), artifact_path="model")
    tags = {
        "kdflow.version": __version__,
        "kdflow.student_key": student.key,
        "kdflow.eval_key": eval_manifest.key,
        "kdflow.teacher_key": eval_manifest.inputs.get("teacher", ""),
        "kdflow.cache_key": student.inputs.get("cache", ""),
        "kdflow.data_key": student.inputs.get("prep", ""),
        "kdflow.config_hash": student.config_hash,
    }
    client = MlflowClient()
    try:
        client.create_registered_model(config.model_name)
    except MlflowException as err:  # another registration created it first: fine
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        config.model_name, source=f"{mlflow_run.info.artifact_uri}/model", run_id=mlflow_run.info.run_id, tags=tags
    )
    client.set_registered_model_alias(config.model_name, config.alias, version.version)
    registration = {
        "model_name": config.model_name,
        "version": int(version.version),
        "alias": config.alias,
        "run_id": mlflow_run.info.run_id,
        "tracking_uri": config.tracking_uri,
    }
    run.write_bytes("registration.json", json.dumps(registration, indent=2).encode())
    return run.finish(details=registration)


def experiment_id(config: RegistryConfig) -> str:
    """The id of `registry.experiment`, created (with its artifact location) when missing."""
    import mlflow

    existing = mlflow.get_experiment_by_name(config.experiment)
    if existing is not None:
        return existing.experiment_id
    return mlflow.create_experiment(config.experiment, artifact_location=_artifact_location(config))


def _artifact_location(config: RegistryConfig) -> str | None:
    if config.artifact_location:
        return config.artifact_location
    parsed = urlparse(config.tracking_uri)
    if parsed.scheme == "sqlite":
        database = Path(config.tracking_uri.removeprefix("sqlite:///"))
        return (database.resolve().parent / "mlartifacts").as_uri()
    return None


def _numeric(mapping: dict) -> dict[str, float]:
    return {key: float(value) for key, value in mapping.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
