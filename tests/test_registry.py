"""Registry promotion behind gates, against a real MLflow tracking server (SQLite) on loopback.

Each registration here is what the register stage does after logging its run: a real MLflow run
with a model artifact, `create_version` (tags: gate outcome, primary metric) and `promote_best`.
The last tests run the register stage itself on tiny students built here from config (a Llama LM,
a multimodal reward model; random weights, real tokenizer, real stage manifests, no training) and
load the champion back by alias: the LM generates, the reward model scores.

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
from kd_core.devtools import migrated_sqlite_uri
from kd_core.registry import REJECTED_TAG, RegistryError, alias_version, create_version, promote, promote_best, rollback

REPO = Path(__file__).resolve().parents[1]

REGISTER_ONE = textwrap.dedent(
    """
    import json, sys, tempfile, time
    from pathlib import Path
    import mlflow
    from mlflow import MlflowClient
    from kd_core.config import RegistryConfig
    from kd_core.registry import create_version, promote_best
    from kd_core.train.tracking import experiment_id

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

    from kd_core.train.tracking import experiment_id

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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ------------------------------------------------------------------ the registered model loads by alias
def tiny_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer trained here on a few sentences, saved as a Hugging Face tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from kd_core.data.tokenizer import END_OF_TEXT, PAD, train_tokenizer

    texts = ["Which digit is written in the image?", "The digit is seven.", "The student learns from the teacher."] * 10
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(texts, 300).tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=PAD, unk_token=END_OF_TEXT,
    )
    wrapped.save_pretrained(folder)
    return folder


def register_student(config: RegistryConfig, store_root: Path, student_dir: Path, task: str, metrics: dict):
    """The register stage on a student directory, with real (hand-made) distill and eval manifests."""
    from kd_core.config import StorageConfig
    from kd_core.stages.register import register as register_stage
    from kd_core.stage import StageRun
    from kd_core.storage import Store

    store = Store(StorageConfig(root=str(store_root)))
    distill = StageRun(store, "distill", {"task": task}, inputs={})
    distill.upload_dir(student_dir, "model")
    student = distill.finish(details={"model_folder": f"{distill.folder}/model"})
    evaluation = StageRun(store, "eval", {"gates": []}, inputs={"student": student})
    eval_metrics = {"task": task, "student": metrics, "gates": [], "gates_passed": True}
    evaluation.write_bytes("metrics.json", json.dumps(eval_metrics).encode())
    return register_stage(config, evaluation.finish(metrics=eval_metrics), student, store, {"task": task})


def test_the_champion_language_model_loads_by_alias_and_generates(registry, tmp_path):
    import mlflow
    import torch
    from transformers import AutoTokenizer

    from kd_core.config import ArchitectureConfig
    from kd_core.models import build_causal_lm, save_model_dir

    config, client = registry
    tokenizer_dir = tiny_tokenizer(tmp_path / "tokenizer")
    model = build_causal_lm(ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2), 300, 32, seed=0).eval()
    save_model_dir(model, tokenizer_dir, tmp_path / "student")
    registration = register_student(config, tmp_path / "store", tmp_path / "student", "causal_lm", {"perplexity": 120.0})
    assert registration.details["champion"] == registration.details["version"]
    version = client.get_model_version(config.model_name, str(registration.details["version"]))
    logged = client.get_logged_model(version.source.removeprefix("models:/"))  # the source is the logged model
    assert version.source.startswith("models:/m-") and (logged.name, logged.source_run_id) == ("model", version.run_id)

    mlflow.set_tracking_uri(config.tracking_uri)
    champion_uri = f"models:/{config.model_name}@champion"
    generated = mlflow.pyfunc.load_model(champion_uri).predict(["The student"], params={"max_new_tokens": 6})
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = tokenizer("The student", return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1)
    assert greedy.shape[1] == prompt.shape[1] + 6
    expected = tokenizer.decode(greedy[0], skip_special_tokens=True)
    assert list(generated) == [expected] and expected.startswith("The student")
    pipeline = mlflow.transformers.load_model(champion_uri)
    assert pipeline.task == "text-generation"


def test_the_champion_reward_model_loads_by_alias_and_scores_rows_as_the_model_does(registry, tmp_path):

    import mlflow
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image
    from tokenizers import Tokenizer

    from kd_core.config import ArchitectureConfig, VisionConfig
    from kd_core.models.reward import build_multimodal_reward_model

    config, client = registry
    config = config.model_copy(update={"primary_metric": "student.pairwise_accuracy_human"})
    tokenizer_dir = tiny_tokenizer(tmp_path / "student")
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    pad_id, seq_len = tokenizer.token_to_id("<|pad|>"), 12
    model = build_multimodal_reward_model(
        VisionConfig(patch_size=2, hidden_size=16, num_layers=1, num_heads=2, fusion="prefix"),
        ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2),
        vocab_size=300, max_positions=seq_len, image_size=8, pad_id=pad_id, seed=0,
    ).eval()
    model.save_pretrained(tmp_path / "student", safe_serialization=True)
    register_student(config, tmp_path / "store", tmp_path / "student", "reward", {"pairwise_accuracy_human": 0.8})

    generator = np.random.default_rng(0)
    images = [generator.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    rows = pd.DataFrame({
        "prompt": ["Which digit is written in the image?"] * 3,
        "response": ["The digit is seven.", "The digit is one.", "The student learns from the teacher. " * 4],  # the last one is cut
        "image": [png_bytes(image) for image in images],
    })
    mlflow.set_tracking_uri(config.tracking_uri)
    scored = mlflow.pyfunc.load_model(f"models:/{config.model_name}@champion").predict(rows)

    # The model's own rewards: the prep stage's student view, built here by hand.
    expected = []
    for prompt, response, image in zip(rows["prompt"], rows["response"], images):
        ids = torch.tensor([tokenizer.encode(f"{prompt}\n{response}").ids[-seq_len:]])
        pixels = np.array(Image.fromarray(image).resize((8, 8), Image.Resampling.BICUBIC), dtype=np.uint8).reshape(1, -1)
        with torch.no_grad():
            expected.append(float(model(input_ids=ids, pixel_values=torch.from_numpy(pixels))[0]))
    assert np.asarray(scored).shape == (3,)
    np.testing.assert_allclose(np.asarray(scored, dtype=np.float64), expected, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(expected, 6))) == 3  # three different rows, three different rewards

    # Models from code: the logged model holds the code and the safetensors weights, nothing pickled.
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{config.model_name}@champion", dst_path=str(tmp_path / "download")))
    assert (files / "pyfunc.py").exists() and (files / "artifacts" / "student" / "model.safetensors").exists()
    assert not [path.name for path in files.rglob("*") if path.suffix in (".pkl", ".pickle", ".bin", ".pt")]


def png_bytes(image) -> bytes:
    from PIL import Image

    buffer = __import__("io").BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_version_with_a_non_finite_primary_metric_never_becomes_champion(registry):
    config, client = registry
    diverged = register(config, perplexity=float("nan"))  # its gates said pass (e.g. none were set)
    assert champion(config, client) is None and alias_version(client, config.model_name, "challenger") == diverged
    register(config, perplexity=float("inf"))
    assert champion(config, client) is None
    sane = register(config, perplexity=150.0)
    assert champion(config, client) == sane


def test_a_training_run_logs_nan_as_nan(tmp_path):
    import math

    from mlflow import MlflowClient

    from kd_core.train.tracking import MlflowLogger, TrainingRun

    registry = RegistryConfig(tracking_uri=migrated_sqlite_uri(tmp_path / "mlflow.db"), experiment="kdflow-nan")
    logger = MlflowLogger(TrainingRun.for_job(registry, "diverging", {}))
    logger.start()
    logger.log(1, {"step": 1, "loss": 2.5})
    logger.log(2, {"step": 2, "loss": float("nan")})
    logger.end()
    history = MlflowClient(tracking_uri=registry.tracking_uri).get_metric_history(logger.run_id, "loss")
    assert [metric.step for metric in history] == [1, 2] and math.isnan(history[1].value)
