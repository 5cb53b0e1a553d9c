"""Registry promotion behind gates, against a real MLflow tracking server (SQLite) on loopback.

Each registration here is what the register stage does after logging its run: a real MLflow run
with a model artifact, `create_version` (tags: gate outcome, primary metric) and `promote_best`.

Run: .venv/bin/python -m pytest tests/test_registry.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from kd_core.config import RegistryConfig
from kd_core.registry import REJECTED_TAG, RegistryError, alias_version, create_version, promote, promote_best, rollback

REPO = Path(__file__).resolve().parents[1]

REGISTER_ONE = textwrap.dedent(
    """
    import json, sys, tempfile, time
    from pathlib import Path
    import mlflow
    from mlflow import MlflowClient
    from kd_core.config import RegistryConfig
    from kd_core.registry import create_version, experiment_id, promote_best

    config = RegistryConfig.model_validate(json.loads(sys.argv[1]))
    perplexity, gates_passed, start_file = float(sys.argv[2]), sys.argv[3] == "pass", Path(sys.argv[4])
    mlflow.set_tracking_uri(config.tracking_uri)
    client = MlflowClient()
    with mlflow.start_run(experiment_id=experiment_id(config)) as run, tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "weights.txt").write_text(f"student with perplexity {perplexity}")
        mlflow.log_artifacts(folder, artifact_path="model")
    Path(f"{start_file}-ready-{perplexity}").touch()
    while not start_file.exists():  # every registrar waits here, then all go at once
        time.sleep(0.01)
    version = create_version(client, config, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                             primary_value=perplexity, gates_passed=gates_passed, tags={})
    print(json.dumps({"version": version, "champion": promote_best(client, config)}))
    """
)


@pytest.fixture
def registry(mlflow_server):
    from mlflow import MlflowClient

    config = RegistryConfig(tracking_uri=mlflow_server, model_name=f"student-{uuid.uuid4().hex[:8]}", experiment="kdflow-registry-tests")
    return config, MlflowClient(tracking_uri=mlflow_server)


def register(config: RegistryConfig, perplexity: float, gates_passed: bool = True) -> str:
    import mlflow

    from kd_core.registry import experiment_id

    mlflow.set_tracking_uri(config.tracking_uri)
    client = mlflow.MlflowClient()
    with mlflow.start_run(experiment_id=experiment_id(config)) as run:
        mlflow.log_text(f"student with perplexity {perplexity}", "model/weights.txt")
    version = create_version(client, config, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                             primary_value=perplexity, gates_passed=gates_passed, tags={})
    promote_best(client, config)
    return version


def champion(config, client) -> str | None:
    return alias_version(client, config.model_name, config.champion_alias)


def test_only_a_better_version_that_passed_its_gates_becomes_champion(registry):
    config, client = registry
    first = register(config, perplexity=130.0)
    assert champion(config, client) == first and alias_version(client, config.model_name, "challenger") == first
    failed = register(config, perplexity=100.0, gates_passed=False)  # better, but failed a gate
    assert champion(config, client) == first and alias_version(client, config.model_name, "challenger") == failed
    worse = register(config, perplexity=140.0)
    assert champion(config, client) == first
    better = register(config, perplexity=120.0)
    assert champion(config, client) == better
    tags = client.get_model_version(config.model_name, failed).tags
    assert (tags["kdflow.gates_passed"], tags["kdflow.primary_metric"], float(tags["kdflow.primary_value"])) == ("false", "student.perplexity", 100.0)
    assert worse != better


def test_a_higher_is_better_metric_ranks_the_other_way(registry):
    config, client = registry
    config = config.model_copy(update={"primary_metric": "agreement_top1"})
    assert config.maximize
    low, high = register(config, 0.5), register(config, 0.7)
    assert champion(config, client) == high != low


def test_concurrent_registrations_leave_the_champion_on_the_best_passing_version(registry, tmp_path):
    config, client = registry
    register(config, perplexity=150.0)  # the sitting champion
    entries = [(127.0, "pass"), (110.0, "fail"), (121.0, "pass"), (133.0, "pass"), (119.0, "pass"), (125.0, "pass")]
    start_file = tmp_path / "go"
    processes = [
        subprocess.Popen([sys.executable, "-c", REGISTER_ONE, config.model_dump_json(), str(perplexity), outcome, str(start_file)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for perplexity, outcome in entries
    ]
    import time

    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("go-ready-*"))) < len(entries) and time.monotonic() < deadline:
        time.sleep(0.1)  # until every registrar has logged its run and reached the start line
    start_file.touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    version_of = {float(client.get_model_version(config.model_name, r["version"]).tags["kdflow.primary_value"]): r["version"] for r in results}
    assert champion(config, client) == version_of[119.0]  # the best that passed; 110 failed its gates


def test_promote_by_hand_and_rollback(registry, tmp_path):
    config, client = registry
    v1 = register(config, 130.0)
    v2 = register(config, 120.0)
    assert champion(config, client) == v2
    # By hand: v1 goes to production; later registrations are compared from v1 on.
    assert promote(client, config, int(v1)) == v1 and champion(config, client) == v1
    v3 = register(config, 125.0)  # beats v1 (the hand-picked floor), though not v2
    assert champion(config, client) == v3
    # Rollback: v3 is rejected and v1, the previous champion, is back.
    assert rollback(client, config) == (v3, v1)
    assert champion(config, client) == v1 and REJECTED_TAG in client.get_model_version(config.model_name, v3).tags
    v4 = register(config, 124.0)  # registered after the rollback: it beats v1
    assert champion(config, client) == v4
    assert rollback(client, config) == (v4, v1)
    # Each rollback walks further back through the champions: before v1 by hand, v2 held it.
    assert rollback(client, config) == (v1, v2)
    with pytest.raises(RegistryError, match="no earlier @champion"):
        rollback(client, config)

    # The same through the CLI, against the same server.
    overrides = [f"registry.tracking_uri={config.tracking_uri}", f"registry.model_name={config.model_name}"]
    cli = [sys.executable, "-m", "kd_core.cli"]
    promoted = subprocess.run([*cli, "promote", "configs/tiny.yaml", v1, *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert promoted.returncode == 0, promoted.stderr
    assert f"@champion -> version {v1} (by hand)" in promoted.stdout and champion(config, client) == v1
    assert REJECTED_TAG not in client.get_model_version(config.model_name, v1).tags  # chosen by a person: no longer rejected
    rolled = subprocess.run([*cli, "rollback", "configs/tiny.yaml", *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rolled.returncode == 0, rolled.stderr
    assert f"version {v1} rejected" in rolled.stdout and champion(config, client) == v2
    missing = subprocess.run([*cli, "promote", "configs/tiny.yaml", "99", *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "error" in missing.stderr
