"""The job as a Kubeflow DAG: kfp.local runs, the compiled pipeline, the distill step's RayJob.

- The tiny job's tune → distill DAG runs through `kfp.local` (SubprocessRunner: every component
  is a subprocess of this Python, through KFP's executor): the search (Ray Tune, Optuna, ASHA,
  MLflow child runs, `Tuner.restore`), the best job distilled, registered only past the gates,
  and the typed outputs (Metrics, HTML).
- A task that fails in kfp.local ends the run with its own one-line cause as the last line: exit 2
  for bad input (a data pattern that matches no file, failing in the prep task before any
  training), 1 otherwise; the executor's dump of the job JSON is left out of the log.
- The committed pipelines/compiled/ YAML matches what `make pipelines` would write now, and
  carries the cluster settings of configs/cluster.yaml (resources, GPUs, placement, secrets).
- `kdflow submit` / `kdflow schedule` through the real KFP client, against a loopback stand-in of
  the KFP v2beta1 REST API that records what the client sends (no KFP server runs here).
- The RayJob: the manifest built from infra/kuberay/rayjob.yaml and a config, and the watch /
  delete logic against a scripted RayJob API (no Kubernetes API server runs on this machine; the
  README says so). Its pod templates are validated against the Kubernetes schemas. The scripted
  API injects the errors the kubernetes client raises (real `ApiException`s built from HTTP
  responses: 500, 503, 429 with Retry-After, 403, 404, 422; urllib3's connection errors) on list,
  create, get and delete, on a virtual clock: transient ones are retried and the job goes on; a
  step whose retries ran out fails and leaves the RayJob running, and its rerun adopts it.
"""

# No `from __future__ import annotations`: KFP reads the test component's annotations as types.
import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from kd_core.config import ConfigError
from kd_core.job import load_config
from kd_core.devtools import KubernetesApiStandIn, migrated_sqlite_uri
from kd_core.kubeflow.job import job_config
from kd_core.kubeflow.rayjob import (
    STEP_KEY_LABEL,
    ApiRetry,
    KubernetesApiRefused,
    KubernetesApiUnavailable,
    RayJobFailed,
    build_rayjob,
    run_rayjob,
    run_step_rayjob,
    step_key,
    step_pod_owner,
    watch_rayjob,
)
from kd_core.kubeflow.steps import run_step
from kd_core.manifest import ManifestError, read_manifest_url
from kd_core.stage import STAGE_CODE_VERSIONS, reuse_only
from kd_core.storage import Store
from pipelines import engines

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "pipelines" / "compiled" / "distill_pipeline.yaml"


# ------------------------------------------------------------------------------ kfp.local DAG
@pytest.mark.slow
def test_kfp_local_tune_distill_dag_searches_distills_the_best_and_registers_only_past_the_gates(tmp_path, monkeypatch, capsys):
    """The tune → distill DAG through kfp.local: a search of 2 trials at once (Ray Tune + Ray
    Train in the tune component's subprocess), then the best job distilled, evaluated, registered."""
    from mlflow import MlflowClient

    from kd_core.pipeline import tune_step
    from kd_core.tune import TRIALS_NAME

    monkeypatch.chdir(tmp_path)
    overrides = [
        f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}",
        f"kubeflow.local_pipeline_root={tmp_path / 'kfp'}", "compute.backend=local", "tune.num_trials=2",
    ]
    config = load_config(REPO / "configs" / "tiny.yaml", overrides)
    steps = engines.run_local(config, "tune-distill")

    # One Ray for the whole DAG: this process started it and the tune task's subprocess joined it (KDFLOW_RAY_ADDRESS)
    # (a driver of another process on this cluster) instead of starting a second one.
    import ray
    from ray.util.state import list_jobs

    assert ray.is_initialized()
    jobs = list_jobs(address=ray.get_runtime_context().gcs_address)  # this cluster (another pytest worker has its own)
    drivers = {job.driver_info.pid for job in jobs if job.type == "DRIVER" and job.driver_info is not None}
    assert len(drivers - {str(os.getpid()), os.getpid()}) >= 1, drivers

    assert list(steps) == ["prep", "teacher", "cache", "tune", "distill", "baseline", "eval", "register"]
    # Collected here under reuse_only (so none ran in this process); all made by the DAG's tasks just now.
    assert not any(manifest.reused for manifest in steps.values()), "every step ran as a DAG task, none was reused"
    store = Store(config.storage)

    # The search: 2 trials at once; values within their ranges. Which trials ASHA stops
    # depends on the order the concurrent trials reach each rung, so the test checks that every stop
    # was earned: the stopped trial was behind another trial at its last report. (That ASHA stops a
    # trailing trial is tested on the scheduler itself in tests/test_tune.py.)
    search = steps["tune"]
    assert search.metrics["trials"] == 2 and search.metrics["errored"] == 0
    trials = json.loads(store.read_bytes(search.output(TRIALS_NAME).path))
    assert search.metrics["stopped_early"] == sum(trial["status"] == "stopped early" for trial in trials)
    for trial in (t for t in trials if t["status"] == "stopped early"):
        step, value = trial["reports"][-1]
        assert any(dict(other["reports"]).get(step, float("inf")) < value for other in trials), trial
    for trial in trials:
        assert 0.1 <= trial["params"]["distill.loss.kd_weight"] <= 0.9
        assert 0.001 <= trial["params"]["distill.train.learning_rate"] <= 0.05
        assert all(step % config.tune.eval_every == 0 for step, _ in trial["reports"])
        assert trial["steps"] == (config.tune.max_steps if trial["status"] == "finished" else trial["reports"][-1][0])
    best = search.details["best_params"]
    assert search.metrics["best_val_loss"] == min(trial["val_loss"] for trial in trials)
    assert search.details["metric"] == "val_loss" and all(trial["metrics"] == {"val_loss": trial["val_loss"]} for trial in trials)

    # The steps after the search ran the best job: its values, the full run's step count.
    distilled = steps["distill"].config
    assert distilled["loss"]["kd_weight"] == pytest.approx(best["distill.loss.kd_weight"])
    assert distilled["train"]["learning_rate"] == pytest.approx(best["distill.train.learning_rate"])
    assert distilled["train"]["max_steps"] == config.distill.train.max_steps

    # MLflow: one parent run with the best values and files, one child run per trial.
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    parent = client.get_run(search.details["mlflow_parent_run_id"])
    assert parent.data.params["best.distill.loss.kd_weight"] == str(best["distill.loss.kd_weight"])
    assert {item.path for item in client.list_artifacts(parent.info.run_id)} >= {"best_config.yaml", "trials.json", "tune.png"}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2

    # KFP's typed outputs: the search's metrics and page, eval's report and metrics.
    (run_folder,) = (tmp_path / "kfp").iterdir()
    page = (run_folder / "tune" / "report").read_text()
    assert "<img" in page and "<th>val_loss</th>" in page
    report = (run_folder / "evaluate" / "report").read_text()
    assert report == store.read_bytes(steps["eval"].output("report.html").path).decode()
    executor_output = json.loads((run_folder / "evaluate" / "executor_output.json").read_text())
    (metrics_artifact,) = executor_output["artifacts"]["metrics"]["artifacts"]
    assert metrics_artifact["metadata"]["student.perplexity"] == pytest.approx(steps["eval"].metrics["student"]["perplexity"])
    assert steps["eval"].metrics["gates_passed"]
    (version,) = client.search_model_versions(f"name = '{config.registry.model_name}'")
    assert client.get_model_version_by_alias(config.registry.model_name, "champion").version == version.version

    # A killed search resumes from Ray Tune's experiment: with its manifest gone (as a kill leaves
    # it), the stage restores the search and reruns no finished trial.
    store.delete(f"{search.folder}/manifest.json")
    experiment = tmp_path / "store" / search.folder / "search"
    trial_results = {path.parent.name: path.read_bytes() for path in experiment.glob("*/result.json")}  # a rerun trial appends
    assert len(trial_results) == 2
    resumed = tune_step(config, steps["prep"], steps["teacher"], steps["cache"])
    assert resumed.details["best_params"] == best and resumed.details["mlflow_parent_run_id"] == parent.info.run_id
    assert {path.parent.name: path.read_bytes() for path in experiment.glob("*/result.json")} == trial_results
    assert len(client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 2

    # A gate that cannot pass: only eval reruns (the search is reused), register is skipped, and
    # --fail-on-gates makes the command exit 3 (what CI checks).
    from kd_core.cli import main

    gate = 'eval.gates=["student.perplexity < 1"]'
    capsys.readouterr()
    code = main(["run", "--engine", "kfp-local", "--pipeline", "tune-distill", "--fail-on-gates", str(REPO / "configs" / "tiny.yaml"), *overrides, gate])
    assert code == 3 and "gates failed: student.perplexity < 1" in capsys.readouterr().err
    assert len(client.search_model_versions(f"name = '{config.registry.model_name}'")) == 1


def test_kfp_local_bad_input_in_a_task_exits_2_with_its_cause_last(tmp_path, capsys):
    from kd_core.cli import main

    pattern = tmp_path / "missing" / "*.jsonl"
    code = main([
        "run", "--engine", "kfp-local", str(REPO / "configs" / "tiny.yaml"), f"storage.root={tmp_path / 'store'}",
        f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}", f"kubeflow.local_pipeline_root={tmp_path / 'kfp'}",
        "data.source=files", f"data.files=[{pattern}]",
    ])
    captured = capsys.readouterr()

    from kd_core.data.sources import SUPPORTED

    cause = f"error: data.files: '{pattern}' matches no file ({SUPPORTED})"
    assert code == 2
    assert captured.err.strip().splitlines()[-2:] == ["kfp.local: the prep task failed (its log is above)", cause]
    assert "Executing task" in captured.out, "kfp's own lines stay"
    assert cause in captured.out and "Traceback" not in captured.out, "the task's log says it in one line"
    assert "executor_input" not in captured.out and '"storage"' not in captured.out, "the job JSON dump is left out"


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def distill_missing_its_inputs(job: str) -> str:
    """A step given too few manifest URLs: a programming error, not bad input."""
    from kd_core.kubeflow.steps import run_step

    return run_step("distill", job, {"prep": "unused"})["distill"]


def test_kfp_local_task_failing_on_other_than_input_is_named_and_not_bad_input(tmp_path, tiny_config):
    from kfp import local

    @dsl.pipeline(name="kdflow-broken")
    def broken():
        distill_missing_its_inputs(job=engines_job(tiny_config))

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"), raise_on_error=True)
    with pytest.raises(engines.DagTaskFailed) as failed:
        engines.run_dag(broken)
    assert failed.value.step == "distill" and failed.value.bad_input is False
    assert str(failed.value) == "ValueError: pipeline step distill needs the manifest URLs of teacher, cache"


def test_executor_input_filter_drops_only_the_executor_info_and_its_json():
    import io

    lines = [
        "    [KFP Executor 2026-01-01 00:00:00,000 INFO]: Looking for component `prep`",
        "    [KFP Executor 2026-01-01 00:00:00,000 INFO]: Got executor_input:",
        "    {", '        "inputs": {', '            "job": "{}"', "        }", "    }",
        "    the component's own line", "    [KFP Executor 2026-01-01 00:00:00,000 WARNING]: kept",
        "    [KFP Executor 2026-01-01 00:00:00,000 INFO]: Got executor_input:", "    not JSON: passed through",
    ]
    sink = io.StringIO()
    quiet = engines.ExecutorInputFilter(sink)
    for line in lines:  # as kfp.local writes it: the indentation and the line in separate writes
        quiet.write(line[:4])
        quiet.write(line[4:] + "\n")
    assert sink.getvalue().splitlines() == [
        "    the component's own line", "    [KFP Executor 2026-01-01 00:00:00,000 WARNING]: kept", "    not JSON: passed through",
    ]


def test_summary_of_a_dag_run_lists_the_steps_that_ran_as_tasks_and_marks_the_reused(capsys):
    from kd_core.cli import print_summary
    from kd_core.manifest import Manifest

    def prep(key: str, reused: bool) -> Manifest:
        metrics = {"documents": 3, "train_tokens": 96}
        return Manifest("prep", key, "", {}, {}, {}, metrics=metrics, details={"task": "causal_lm", "vocab_size": 300}, reused=reused)

    print_summary({"prep": prep("made-before", True)}, 1.0, dag="kfp.local")
    reused = capsys.readouterr().out
    assert "ran as Kubeflow DAG tasks (kfp.local): none" in reused and "reused" in reused
    print_summary({"prep": prep("made-now", False)}, 1.0, dag="kfp.local")
    ran = capsys.readouterr().out
    assert "ran as Kubeflow DAG tasks (kfp.local): prep" in ran and "reused" not in ran.split("ran as")[0]


def test_kfp_local_engine_refuses_force(capsys):
    from kd_core.cli import main

    assert main(["run", "--engine", "kfp-local", str(REPO / "configs" / "tiny.yaml"), "--force", "eval"]) == 2
    assert "--force" in capsys.readouterr().err


# ------------------------------------------------------------------------------ components
def test_step_inputs_are_checked_before_any_work(tiny_config):
    with pytest.raises(ConfigError, match="not JSON"):
        run_step("prep", "{not json", {})
    with pytest.raises(ConfigError, match="data.seq_len"):
        job_config(json.dumps({"data": {"seq_len": 2}}))
    with pytest.raises(ValueError, match="needs the manifest URLs of teacher, cache"):
        run_step("distill", engines_job(tiny_config), {"prep": "x"})
    store = Store(tiny_config.storage)
    with pytest.raises(ManifestError, match="not a step manifest under the job's storage root"):
        read_manifest_url(store, "s3://elsewhere/prep/abc/manifest.json", STAGE_CODE_VERSIONS)
    with pytest.raises(ManifestError, match="has not finished"):
        read_manifest_url(store, store.url("prep/0123456789abcdef0123/manifest.json"), STAGE_CODE_VERSIONS)


def test_reuse_only_never_runs_a_missing_stage(tiny_config):
    from kd_core.pipeline import prep_step

    with reuse_only(), pytest.raises(ManifestError, match="expected to have run already"):
        prep_step(tiny_config)
    assert not Path(tiny_config.storage.root).exists() or not any(Path(tiny_config.storage.root).rglob("*.arrow"))


def engines_job(config) -> str:
    from kd_core.kubeflow.job import job_json

    return job_json(config)


# ------------------------------------------------------------------------------ compiled DAG
@pytest.mark.parametrize("pipeline", ["distill", "tune-distill"])
def test_committed_pipeline_yaml_is_current(tmp_path, pipeline):
    name = f"{pipeline.replace('-', '_')}_pipeline.yaml"
    fresh = engines.compile_pipeline(load_config(REPO / "configs" / "cluster.yaml"), tmp_path / name, pipeline)
    committed = REPO / "pipelines" / "compiled" / name
    assert fresh.read_text() == committed.read_text(), "pipelines/compiled/ is stale: run `make pipelines` and commit it"


def test_tune_distill_pipeline_runs_the_steps_after_the_search_with_the_best_job():
    spec, _ = yaml.safe_load_all((REPO / "pipelines" / "compiled" / "tune_distill_pipeline.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"prep", "cache", "tune", "distill", "evaluate", "condition-1"}
    assert tasks["tune"]["inputs"]["parameters"]["job"] == {"componentInputParameter": "job"}
    for step in ("distill", "evaluate"):
        assert tasks[step]["inputs"]["parameters"]["job"] == {"taskOutputParameter": {"outputParameterKey": "best_job", "producerTask": "tune"}}


def test_compiled_pipeline_carries_the_cluster_settings():
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    config = load_config(REPO / "configs" / "cluster.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"prep", "cache", "distill", "evaluate", "condition-1"}
    register = spec["components"]["comp-condition-1"]["dag"]["tasks"]["register"]
    condition = tasks["condition-1"]["triggerPolicy"]["condition"]
    assert "evaluate-Output" in condition and "== true" in condition
    for task in [tasks["prep"], tasks["cache"], tasks["distill"], tasks["evaluate"], register]:
        assert task.get("cachingOptions") == {}, "KFP caching must be off: the steps' inputs live outside KFP"
    executors = spec["deploymentSpec"]["executors"]
    for step, executor in (("cache", "exec-cache"), ("eval", "exec-evaluate"), ("prep", "exec-prep")):
        wanted, container = config.kubeflow.steps[step], executors[executor]["container"]
        assert container["image"] == config.kubeflow.image
        assert container["resources"]["resourceCpuRequest"] == wanted.cpu
        assert container["resources"]["resourceMemoryLimit"] == wanted.memory
        assert ("accelerator" in container["resources"]) == (wanted.accelerators > 0)
    assert executors["exec-cache"]["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(kubernetes) == set(executors)
    for executor in kubernetes.values():
        secrets = {entry["secretName"]: {pair["envVar"] for pair in entry["keyToEnv"]} for entry in executor["secretAsEnv"]}
        assert secrets == {"kdflow-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, "kdflow-mlflow": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}}
    assert kubernetes["exec-cache"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert kubernetes["exec-cache"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeSelector" not in kubernetes["exec-prep"]


def test_no_credential_reaches_the_compiled_pipeline(tmp_path):
    config = load_config(REPO / "configs" / "cluster.yaml", ["storage.s3.secret_access_key=do-not-leak-me"])
    text = engines.compile_pipeline(config, tmp_path / "p.yaml").read_text()
    assert "do-not-leak-me" not in text


def test_schedule_needs_a_six_field_cron():
    assert engines.check_cron(" 0 0 3 * *  * ") == "0 0 3 * * *"
    with pytest.raises(ConfigError, match="six fields"):
        engines.check_cron("0 3 * * *")


class KfpApiStandIn:
    """Answers the KFP v2beta1 endpoints that submit and schedule use, and records every request."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict | None]] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                requests.append(("GET", self.path, None))
                self.reply({"experiments": []})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                requests.append(("POST", self.path.split("?")[0], body))
                ids = {"/apis/v2beta1/experiments": "experiment_id", "/apis/v2beta1/runs": "run_id", "/apis/v2beta1/recurringruns": "recurring_run_id"}
                self.reply({ids[self.path.split("?")[0]]: "id-1", **body})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def posted(self, path: str) -> dict:
        (body,) = [body for method, where, body in self.requests if method == "POST" and where == path]
        return body


@pytest.fixture
def kfp_api():
    stand_in = KfpApiStandIn()
    yield stand_in
    stand_in.server.shutdown()


def test_submit_sends_the_compiled_dag_with_the_service_account_and_no_caching(kfp_api, capsys):
    from kd_core.cli import main

    assert main(["submit", str(REPO / "configs" / "cluster.yaml"), f"kubeflow.host={kfp_api.url}"]) == 0
    assert "run id-1" in capsys.readouterr().out
    assert kfp_api.posted("/apis/v2beta1/experiments") == {"display_name": "kdflow", "namespace": "kdflow"}
    run = kfp_api.posted("/apis/v2beta1/runs")
    assert run["display_name"] == "kdflow-cluster" and run["service_account"] == "kdflow-pipeline"
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "kdflow-distill"
    assert "secretAsEnv" in json.dumps(run["pipeline_spec"]["platform_spec"])
    spec, _ = yaml.safe_load_all(COMPILED.read_text())
    def shape(tasks):
        return {name: (task["componentRef"], task.get("dependentTasks")) for name, task in tasks.items()}

    assert shape(run["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]) == shape(spec["root"]["dag"]["tasks"])


def test_schedule_creates_one_recurring_run_at_a_time_without_catch_up(kfp_api, capsys):
    from kd_core.cli import main

    assert main(["schedule", str(REPO / "configs" / "cluster.yaml"), f"kubeflow.host={kfp_api.url}", "--cron", "0 0 3 * * *"]) == 0
    assert "recurring run id-1" in capsys.readouterr().out
    recurring = kfp_api.posted("/apis/v2beta1/recurringruns")
    assert recurring["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert int(recurring["max_concurrency"]) == 1 and recurring["no_catchup"] is True
    assert recurring["service_account"] == "kdflow-pipeline" and recurring["experiment_id"] == "id-1"
    assert main(["schedule", str(REPO / "configs" / "cluster.yaml"), f"kubeflow.host={kfp_api.url}", "--cron", "0 3 * * *"]) == 2


def test_submit_without_an_endpoint_says_which_field(capsys, monkeypatch):
    from kd_core.cli import main

    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    assert main(["submit", str(REPO / "configs" / "tiny.yaml")]) == 2
    assert "kubeflow.host" in capsys.readouterr().err


# ------------------------------------------------------------------------------ RayJob
def test_rayjob_manifest_follows_the_config():
    from kubernetes_validate import validate

    config = load_config(REPO / "configs" / "cluster.yaml")
    inputs = {"prep": "s3://kdflow/runs/prep/a/manifest.json", "teacher": "s3://kdflow/runs/teacher/b/manifest.json", "cache": ""}
    job = build_rayjob(config, "distill", inputs, "kdflow-distill-test")
    assert job["kind"] == "RayJob" and job["metadata"] == {**job["metadata"], "name": "kdflow-distill-test", "namespace": "kdflow"}
    cluster = job["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1  # 8 workers, 8 GPUs per pod
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"] == {"cpu": "64", "memory": "900Gi", "nvidia.com/gpu": "8"}
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "tolerations" not in head and "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    for pod in (head, worker):
        assert pod["containers"][0]["image"] == config.kubeflow.image
        env = {entry["name"]: entry for entry in pod["containers"][0]["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "kdflow-s3", "key": "secret_access_key"}
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
        validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod}, "1.30.0", strict=True)
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    inner = job_config(runtime_env["KDFLOW_JOB"])
    assert inner.compute.ray_address == "auto" and inner.compute.use_gpu and not inner.kubeflow.rayjob.enabled
    assert inner.distill == config.distill and json.loads(runtime_env["KDFLOW_STEP_INPUTS"]) == inputs

    four_gpu_pods = load_config(REPO / "configs" / "cluster.yaml", ["compute.num_workers=16", "kubeflow.rayjob.worker.accelerators=4", "compute.cpus_per_worker=16"])
    (group,) = build_rayjob(four_gpu_pods, "distill", inputs, "x")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 4
    with pytest.raises(ConfigError, match="compute.num_workers .12. must be a multiple of kubeflow.rayjob.worker.accelerators"):
        build_rayjob(load_config(REPO / "configs" / "cluster.yaml", ["compute.num_workers=12", "teacher.train.batch_size=48", "distill.train.batch_size=48", "distill.deepspeed.gradient_accumulation_steps=1"]), "distill", inputs, "x")
    with pytest.raises(ConfigError, match="compute.cpus_per_worker"):
        build_rayjob(load_config(REPO / "configs" / "cluster.yaml", ["compute.cpus_per_worker=9"]), "distill", inputs, "x")


class ScriptedRayJobs:
    """A stand-in for the Kubernetes API's RayJob endpoints: each answered `get` returns the next
    status of a script (the last one repeats); `on_get` can act in between (e.g. deliver a signal).
    `faults`: method -> what its next calls raise before answering (None: answer that call).
    `existing`: RayJobs in the namespace before the step (`list` finds them and the created ones).
    `calls` records every answered call in order; a watcher that never stops fails at the 1000th get."""

    def __init__(self, statuses, on_get=None, faults=None, existing=()):
        self.statuses, self.on_get, self.faults = list(statuses), on_get, {name: list(queue) for name, queue in (faults or {}).items()}
        self.jobs = list(existing)
        self.created, self.deleted, self.owners, self.fenced, self.calls, self.gets = [], [], [], [], [], 0

    def _fault(self, method):
        queue = self.faults.get(method)
        fault = queue.pop(0) if queue else None
        if fault is not None:
            raise fault

    def list(self, namespace, label_selector):
        self._fault("list")
        self.calls.append(("list", label_selector))
        label, value = label_selector.split("=")
        return [job for job in self.jobs if job["metadata"]["labels"].get(label) == value]

    def create(self, namespace, body):
        self._fault("create")
        self.calls.append(("create", body["metadata"]["name"]))
        self.created.append((namespace, body["metadata"]["name"]))
        self.jobs.append({**body, "status": {}})
        return body

    def fence(self, namespace, rayjob):
        self._fault("fence")
        self.calls.append(("fence", rayjob["metadata"]["name"]))
        self.fenced.append(rayjob["metadata"]["name"])

    def get(self, namespace, name):
        self._fault("get")
        self.gets += 1
        assert self.gets < 1000, "1000 polls: the watcher does not stop"
        self.calls.append(("get", name))
        if self.on_get:
            self.on_get(self.gets)
        status = self.statuses[min(self.gets, len(self.statuses)) - 1]
        return {"metadata": {"name": name}, "status": status}

    def set_owners(self, namespace, name, owners):
        self._fault("set_owners")
        self.calls.append(("set_owners", name))
        self.owners.append((name, owners))

    def delete(self, namespace, name):
        self._fault("delete")
        self.calls.append(("delete", name))
        self.deleted.append((namespace, name))


def api_error(status, reason, retry_after=None, message=None):
    """What the kubernetes client raises for an HTTP error: an ApiException made from the response."""
    import urllib3
    from kubernetes.client.exceptions import ApiException
    from kubernetes.client.rest import RESTResponse

    headers = {"Content-Type": "application/json", **({"Retry-After": str(retry_after)} if retry_after is not None else {})}
    body = json.dumps({"kind": "Status", "status": "Failure", "message": message or reason.lower(), "code": status}).encode()
    response = RESTResponse(urllib3.HTTPResponse(body=body, headers=headers, status=status, reason=reason, preload_content=True))
    response.data = response.data.decode()
    return ApiException(http_resp=response)


def connection_reset():
    """What urllib3 raises when the API server's connection drops mid-request."""
    import urllib3

    return urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))


class VirtualClock:
    """`sleep` and `clock` for the watcher: sleeping advances the time at once and is recorded."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self):
        return self.now


def _rayjob(name="kdflow-distill-t", owner=None):
    return build_rayjob(load_config(REPO / "configs" / "cluster.yaml"), "distill", {"prep": "x"}, name, owner=owner)


def test_rayjob_watch_reports_each_change_and_returns_on_success():
    api = ScriptedRayJobs([
        {}, {"jobDeploymentStatus": "Initializing"}, {"jobDeploymentStatus": "Initializing"},
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
        {"jobDeploymentStatus": "Running", "jobStatus": "FAILED"},  # a failed attempt KubeRay may retry
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
        {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
    ])
    lines = []
    status = run_rayjob(api, _rayjob(), poll_seconds=0, report=lines.append, sleep=lambda s: None)
    assert status.succeeded and api.gets == 7
    assert api.created == api.deleted == [("kdflow", "kdflow-distill-t")]
    changes = [line for line in lines if line.startswith("RayJob kdflow-distill-t:")]
    assert changes == [
        "RayJob kdflow-distill-t: New, Ray job PENDING", "RayJob kdflow-distill-t: Initializing, Ray job PENDING",
        "RayJob kdflow-distill-t: Running, Ray job RUNNING", "RayJob kdflow-distill-t: Running, Ray job FAILED",
        "RayJob kdflow-distill-t: Running, Ray job RUNNING", "RayJob kdflow-distill-t: Complete, Ray job SUCCEEDED",
    ]


@pytest.mark.parametrize("final", [
    {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "reason": "AppFailed", "message": "CUDA out of memory"},
    {"jobDeploymentStatus": "Failed", "jobStatus": "RUNNING", "reason": "DeadlineExceeded", "message": "activeDeadlineSeconds passed"},
    {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"},
    {"jobDeploymentStatus": "ValidationFailed", "jobStatus": "", "reason": "ValidationFailed", "message": "invalid runtimeEnvYAML"},
])
def test_a_failed_rayjob_fails_the_step_with_its_reason_and_is_deleted(final):
    api = ScriptedRayJobs([{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, final])
    with pytest.raises(RayJobFailed) as failure:
        run_rayjob(api, _rayjob(), poll_seconds=0, report=lambda line: None, sleep=lambda s: None)
    assert final["jobDeploymentStatus"] in str(failure.value) and final.get("message", "") in str(failure.value)
    assert api.deleted == [("kdflow", "kdflow-distill-t")]


def test_a_cancelled_step_deletes_its_rayjob():
    """KFP cancels a run by terminating the step's pod: SIGTERM must still delete the RayJob, even
    through a failing API (the delete is retried within the pod's grace period)."""
    def terminate(gets):
        if gets == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    faults = {"delete": [api_error(503, "Service Unavailable")]}
    api = ScriptedRayJobs([{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}], on_get=terminate, faults=faults)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match="terminated"):
        run_rayjob(api, _rayjob(), poll_seconds=0, report=lambda line: None, sleep=lambda s: None)
    assert api.deleted == [("kdflow", "kdflow-distill-t")]
    assert signal.getsignal(signal.SIGTERM) == before

    def interrupt(gets):
        raise KeyboardInterrupt

    api = ScriptedRayJobs([{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}], on_get=interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_rayjob(api, _rayjob(), poll_seconds=0, report=lambda line: None, sleep=lambda s: None)
    assert api.deleted == [("kdflow", "kdflow-distill-t")]


def test_watch_alone_does_not_delete():
    api = ScriptedRayJobs([{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    assert watch_rayjob(api, "kdflow", "j", poll_seconds=0, report=lambda line: None, sleep=lambda s: None).succeeded
    assert api.deleted == []


RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
SUCCEEDED = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}


def test_transient_api_errors_are_retried_and_the_job_is_neither_failed_nor_deleted_while_it_runs():
    """500 on list, a dropped connection and a 504 that did create the job (then 409) on create,
    429 with Retry-After, 503 and a dropped connection on get: the step rides them all out."""
    faults = {
        "list": [api_error(500, "Internal Server Error")],
        "create": [connection_reset(), None, api_error(409, "Conflict")],
        "get": [None, api_error(429, "Too Many Requests", retry_after=7), api_error(503, "Service Unavailable"), connection_reset()],
    }
    api = ScriptedRayJobs([RUNNING, RUNNING, SUCCEEDED], faults=faults)
    # the second create "times out" after the job was stored: the scripted API answers it, the step sees a 504
    original_create = api.create

    def create_that_lands_then_times_out(namespace, body):
        original_create(namespace, body)
        if len(api.created) == 1:
            raise api_error(504, "Gateway Timeout")

    api.create = create_that_lands_then_times_out
    clock, lines = VirtualClock(), []
    status = run_rayjob(api, _rayjob(), poll_seconds=10, report=lines.append, sleep=clock.sleep, clock=clock, retry=ApiRetry(900, 1, 60))

    assert status.succeeded and api.created == [("kdflow", "kdflow-distill-t")]
    # The create that landed is read back (the first get), then fenced with its NetworkPolicy.
    assert [call for call, _ in api.calls] == ["list", "create", "get", "fence", "get", "get", "delete"], "deleted only once it succeeded"
    waits = [seconds for seconds in clock.sleeps if seconds != 10]
    assert len(waits) == 6  # list 1, create 2, get 3
    assert 0.5 <= waits[0] <= 1.0 and 0.5 <= waits[1] <= 1.0 and 1.0 <= waits[2] <= 2.0  # doubling, jittered
    assert waits[3] == 7.0, "Retry-After is waited out"
    assert sum("retry" in line for line in lines) == 6 and any("429 Too Many Requests" in line for line in lines)


def test_retries_used_up_fail_the_step_and_leave_the_rayjob_running_for_a_rerun_to_adopt():
    pod_a = {"apiVersion": "v1", "kind": "Pod", "name": "step-a", "uid": "uid-a"}
    pod_b = {"apiVersion": "v1", "kind": "Pod", "name": "step-b", "uid": "uid-b"}
    outage = [api_error(503, "Service Unavailable")] * 100
    api = ScriptedRayJobs([RUNNING, RUNNING, SUCCEEDED], faults={"get": [None, *outage]})
    clock = VirtualClock()
    with pytest.raises(KubernetesApiUnavailable) as failure:
        run_rayjob(api, _rayjob("kdflow-distill-a", pod_a), poll_seconds=10, report=lambda line: None, sleep=clock.sleep, clock=clock,
                   retry=ApiRetry(120, 1, 30))
    message = str(failure.value)
    assert "503 Service Unavailable" in message and "kubeflow.rayjob.api_retry_seconds = 120" in message
    assert "RayJob kdflow/kdflow-distill-a is left running" in message and "kubectl get rayjob -n kdflow kdflow-distill-a" in message
    assert api.deleted == [] and clock.now <= 10 + 120

    api.faults = {}  # the API is back; KFP retries the step in a new pod, which builds a new RayJob of the same key
    status = run_rayjob(api, _rayjob("kdflow-distill-b", pod_b), poll_seconds=0, report=lambda line: None, sleep=clock.sleep, clock=clock)
    assert status.succeeded
    assert api.created == [("kdflow", "kdflow-distill-a")], "adopted, not created a second time"
    assert api.calls[-2:] == [("get", "kdflow-distill-a"), ("delete", "kdflow-distill-a")]
    assert api.owners == [("kdflow-distill-a", [pod_a, pod_b])], "the adopting pod owns it too"
    assert api.fenced == ["kdflow-distill-a", "kdflow-distill-a"], "fenced when created, and again (kept) when adopted"


def test_only_a_rayjob_still_going_is_adopted():
    failed = _rayjob("kdflow-distill-old") | {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}}
    other_key = _rayjob("kdflow-distill-other") | {"status": RUNNING}
    other_key["metadata"] = {**other_key["metadata"], "labels": {**other_key["metadata"]["labels"], STEP_KEY_LABEL: "0" * 20}}
    api = ScriptedRayJobs([SUCCEEDED], existing=[failed, other_key])
    run_rayjob(api, _rayjob(), poll_seconds=0, report=lambda line: None, sleep=lambda s: None)
    assert api.created == [("kdflow", "kdflow-distill-t")]


@pytest.mark.parametrize("method, error, says", [
    ("get", api_error(403, "Forbidden", message='rayjobs.ray.io "j" is forbidden'), "see infra/k8s/rbac.yaml"),
    ("get", api_error(404, "Not Found", message='rayjobs.ray.io "j" not found'), "the RayJob is gone"),
    ("create", api_error(422, "Unprocessable Entity", message="spec.entrypoint: Required value"), "check kubeflow.rayjob"),
    ("list", api_error(404, "Not Found", message="the server could not find the requested resource"), "is the KubeRay operator"),
])
def test_permanent_api_errors_fail_at_once_and_delete_nothing(method, error, says):
    api = ScriptedRayJobs([RUNNING, SUCCEEDED], faults={method: [error]})
    clock = VirtualClock()
    with pytest.raises(KubernetesApiRefused) as failure:
        run_rayjob(api, _rayjob(), poll_seconds=10, report=lambda line: None, sleep=clock.sleep, clock=clock)
    assert says in str(failure.value) and str(error.status) in str(failure.value)
    assert clock.sleeps == [] and api.deleted == []


def test_rayjob_is_labelled_with_its_step_key_and_owned_by_the_step_pod_known_through_the_downward_api(monkeypatch):
    config = load_config(REPO / "configs" / "cluster.yaml")
    inputs = {"prep": "s3://kdflow/runs/prep/a/manifest.json"}
    key = step_key(config, "distill", inputs)
    assert key == step_key(load_config(REPO / "configs" / "cluster.yaml", ["kubeflow.rayjob.poll_seconds=1"]), "distill", inputs)
    assert key != step_key(load_config(REPO / "configs" / "cluster.yaml", ["distill.train.learning_rate=0.1"]), "distill", inputs)
    assert key != step_key(config, "distill", {"prep": "s3://kdflow/runs/prep/b/manifest.json"}) != step_key(config, "tune", inputs)

    pod = {"KDFLOW_POD_NAME": "kdflow-abc-distill", "KDFLOW_POD_UID": "0f9e", "KDFLOW_POD_NAMESPACE": "kdflow"}
    assert step_pod_owner("kdflow", {}) is None
    assert step_pod_owner("kdflow", {**pod, "KDFLOW_POD_NAMESPACE": "kubeflow"}, report=lambda line: None) is None
    for variable, value in pod.items():
        monkeypatch.setenv(variable, value)
    api = ScriptedRayJobs([SUCCEEDED])
    run_step_rayjob(config, "distill", inputs, api=api)
    created = next(job for job in api.jobs if job["metadata"]["name"] == api.created[0][1])
    assert created["metadata"]["labels"][STEP_KEY_LABEL] == key and api.calls[0] == ("list", f"{STEP_KEY_LABEL}={key}")
    assert created["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "kdflow-abc-distill", "uid": "0f9e"}]

    for variable in pod:
        monkeypatch.delenv(variable)
    api = ScriptedRayJobs([SUCCEEDED])
    run_step_rayjob(config, "distill", inputs, api=api)
    assert "ownerReferences" not in api.jobs[0]["metadata"]


def test_the_long_steps_are_retried_by_kfp_and_know_their_pod():
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    config = load_config(REPO / "configs" / "cluster.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    for step in ("cache", "distill"):
        policy = tasks[step]["retryPolicy"]
        assert policy["maxRetryCount"] == 2 and policy["backoffDuration"] == "60s" and policy["backoffFactor"] == 2.0
        assert int(policy["backoffMaxDuration"].removesuffix("s")) > config.kubeflow.rayjob.active_deadline_seconds
    assert "retryPolicy" not in tasks["prep"] and "retryPolicy" not in tasks["evaluate"]
    tune_spec, _ = yaml.safe_load_all((REPO / "pipelines" / "compiled" / "tune_distill_pipeline.yaml").read_text())
    assert tune_spec["root"]["dag"]["tasks"]["tune"]["retryPolicy"]["maxRetryCount"] == 2
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {entry["name"]: entry["fieldPath"] for entry in kubernetes["exec-distill"]["fieldPathAsEnv"]} == {
        "KDFLOW_POD_NAME": "metadata.name", "KDFLOW_POD_UID": "metadata.uid", "KDFLOW_POD_NAMESPACE": "metadata.namespace",
    }
    assert kubernetes["exec-distill"]["podMetadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    assert "fieldPathAsEnv" not in kubernetes["exec-prep"] and "podMetadata" not in kubernetes["exec-prep"]
    assert engines.local_job(config).kubeflow.retry.retries == 0, "kfp.local shows a failure at once"
    with pytest.raises(ConfigError, match="kubeflow: retry.max_duration_seconds .* must exceed rayjob.active_deadline_seconds"):
        load_config(REPO / "configs" / "cluster.yaml", ["kubeflow.retry.max_duration_seconds=3600"])


def test_the_kubernetes_client_errors_are_read_as_transient_or_not_through_a_loopback_api():
    """The real kubernetes client against a loopback stand-in: a 429 with Retry-After and a 503 are
    retried, the list filters by the step key, the owners go in a merge patch; a closed port is a
    transient error, a 403 is not."""
    from kubernetes import client

    from kd_core.kubeflow.rayjob import ApiError, KubernetesRayJobApi

    stand_in = KubernetesApiStandIn({"GET": [(429, [("Retry-After", "3")]), (503, [])]})
    try:
        api = KubernetesRayJobApi(client.Configuration(host=stand_in.url))
        clock = VirtualClock()
        status = run_rayjob(api, _rayjob(), poll_seconds=0, report=lambda line: None, sleep=clock.sleep, clock=clock)
        assert status.succeeded and stand_in.jobs == {}
        assert clock.sleeps[0] == 3.0 and len(clock.sleeps) == 2
        methods = [(method, path.split("?")[0].removeprefix(stand_in.PREFIX)) for method, path, _ in stand_in.requests]
        assert methods == [("GET", "")] * 3 + [
            ("POST", ""), ("POST", "/apis/networking.k8s.io/v1/namespaces/kdflow/networkpolicies"),
            ("GET", "/kdflow-distill-t"), ("DELETE", "/kdflow-distill-t"),
        ]
        assert stand_in.policies[0]["metadata"]["ownerReferences"][0]["uid"] == "uid-kdflow-distill-t"
        assert f"labelSelector=kdflow%2Fstep-key%3D{_rayjob()['metadata']['labels'][STEP_KEY_LABEL]}" in stand_in.requests[0][1]

        stand_in.jobs["j"] = {"metadata": {"name": "j"}}
        api.set_owners("kdflow", "j", [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u"}])
        assert stand_in.requests[-1][0::2] == ("PATCH", "application/merge-patch+json")
        assert stand_in.jobs["j"]["metadata"]["ownerReferences"][0]["uid"] == "u"

        stand_in.faults["GET"] = [(403, [])]
        with pytest.raises(Exception) as forbidden:
            api.get("kdflow", "j")
        assert ApiError.of(forbidden.value).transient is False and ApiError.of(forbidden.value).status == 403
    finally:
        stand_in.server.shutdown()
        stand_in.server.server_close()
    with pytest.raises(Exception) as refused:
        KubernetesRayJobApi(client.Configuration(host=stand_in.url)).get("kdflow", "j")
    assert ApiError.of(refused.value).transient is True, repr(refused.value)
    # An API server that takes the connection and never answers: a timeout, retried like any outage.
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        api = KubernetesRayJobApi(client.Configuration(host=f"http://127.0.0.1:{silent.getsockname()[1]}"))
        api.REQUEST_TIMEOUT = (1.0, 0.2)
        with pytest.raises(Exception) as timed_out:
            api.get("kdflow", "j")
    assert ApiError.of(timed_out.value).transient is True and "Timeout" in ApiError.of(timed_out.value).description
