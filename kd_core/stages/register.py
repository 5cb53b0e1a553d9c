"""The register stage: log the student to MLflow, register it, and promote it only through gates.

One MLflow run per registration holds the job's public config as params (no secrets), where the
student's weights started (`student.start.*` params, from the distill manifest's
`details["student_start"]`, URLs without credentials; also the model version's
`kdflow.student_start` tag), the eval metrics and files, and the student as an MLflow model
logged by the job's task (`Task.log_model`);
a new version of `registry.model_name` is created from it and promoted only through its gates
(`kd_core/registry`: `create_version`, `promote_best`). The task is the one the eval stage
recorded in its metrics.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from kd_core import __version__
from kd_core.config import RegistryConfig, flatten
from kd_core.gates import metric_value
from kd_core.manifest import Manifest
from kd_core.models import model_copy
from kd_core.redaction import redact
from kd_core.registry import GATES_TAG, MAX_PARAM_LENGTH, MAX_TAG_LENGTH, STUDENT_START_TAG, create_version, numeric_metrics, promote_best
from kd_core.stage import StageRun
from kd_core.storage import Store, inside
from kd_core.tasks import task_named
from kd_core.train.tracking import experiment_id


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

    run = StageRun(store, "register", config, inputs={"eval": eval_manifest, "student": student}, force=force)
    if run.reused:
        return run.reused
    start = student.details.get("student_start", {"init": "config"})  # a student trained before kdflow recorded it: from config
    mlflow.set_tracking_uri(config.tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id(config), run_name=f"register-{student.key[:8]}") as mlflow_run:
        mlflow.log_params({key: redact(str(value))[:MAX_PARAM_LENGTH] for key, value in flatten(job_params).items()})
        mlflow.log_params({key: redact(str(value))[:MAX_PARAM_LENGTH] for key, value in flatten(start, "student.start.").items()})
        mlflow.log_metrics(numeric_metrics(flatten(eval_manifest.metrics)))
        with tempfile.TemporaryDirectory() as folder:
            for name, record in eval_manifest.outputs.items():
                fix = "the eval manifest was not written by kdflow: delete its folder and rerun eval"
                destination = inside(Path(folder), name, f"{eval_manifest.folder}: output", fix)
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(store.read_bytes(record.path))
            mlflow.log_artifacts(folder, artifact_path="eval")
        gates = eval_manifest.metrics.get("gates", [])
        gates_passed = eval_manifest.metrics.get("gates_passed", True)
        mlflow.log_metric("gates_passed", float(gates_passed))
        mlflow.log_dict({"gates": gates, "passed": gates_passed}, "eval/gates.json")
        logged = task_named(eval_manifest.metrics["task"]).log_model(model_copy(store, student))
    tags = {
        "kdflow.version": __version__,
        "kdflow.student_key": student.key,
        "kdflow.eval_key": eval_manifest.key,
        "kdflow.teacher_key": eval_manifest.inputs.get("teacher", ""),
        "kdflow.cache_key": student.inputs.get("cache", ""),
        "kdflow.data_key": student.inputs.get("prep", ""),
        "kdflow.student_tokenizer_key": student.inputs.get("student_tokenizer", ""),
        "kdflow.config_hash": student.config_hash,
        GATES_TAG: json.dumps(gates)[:MAX_TAG_LENGTH],
        STUDENT_START_TAG: redact(json.dumps(start))[:MAX_TAG_LENGTH],
    }
    client = MlflowClient()
    version = create_version(
        client, config, source=logged.model_uri, run_id=mlflow_run.info.run_id, model_id=logged.model_id,
        primary_value=metric_value(config.primary_metric, eval_manifest.metrics), gates_passed=gates_passed, tags=tags,
    )
    champion = promote_best(client, config)
    registration = {
        "model_name": config.model_name,
        "version": int(version),
        "alias": config.alias,
        "gates_passed": gates_passed,
        "champion": int(champion) if champion is not None else None,
        "champion_alias": config.champion_alias,
        "run_id": mlflow_run.info.run_id,
        "tracking_uri": config.tracking_uri,
    }
    run.write_bytes("registration.json", json.dumps(registration, indent=2).encode())
    return run.finish(details=registration)
