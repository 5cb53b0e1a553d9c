"""Secrets never reach a message: what each sink writes when a job carries credentials.

- A config error on a `SecretStr` field names the field and masks the value; one on a field
  holding a URL names the URL without its password.
- Credentials written into URLs (user:password, a token as user, presigned query signatures)
  are masked, and nothing else is, in: manifests as written to the store, console messages
  (`progress.say`, `kdflow validate`), bad-input errors (`InputError`) and the one-line cause of a failed step,
  the MLflow params of a training run (a real SQLite tracking store), and the compiled KFP
  pipeline (the real compiler).

    PYTHONPATH=$PWD python -m pytest tests/test_secrets.py -q
"""

from __future__ import annotations

import json

import pytest

PASSWORD, SIGNATURE, TOKEN = "hunter2-pw", "f00dfeedsig", "ghp-token-123"
SECRET_DATA_URLS = [
    f"https://reader:{PASSWORD}@data.example.com/corpus/part-0.jsonl",
    f"https://bucket.s3.amazonaws.com/part-1.jsonl?X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature={SIGNATURE}&v=2",
    f"https://{TOKEN}@git.example.com/corpus/part-2.jsonl",
]
SECRETS = (PASSWORD, SIGNATURE, TOKEN, "AKIAEXAMPLE")


def assert_no_secret(text: str, where: str) -> None:
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"{where} carries {leaked}"
    # ...and still names the files: only the credentials go.
    for host in ("data.example.com/corpus/part-0.jsonl", "bucket.s3.amazonaws.com/part-1.jsonl", "git.example.com/corpus/part-2.jsonl"):
        assert host in text, f"{where} lost {host}"


def job_with_secret_urls(tiny_config):
    data = tiny_config.data.model_copy(update={"source": "files", "files": SECRET_DATA_URLS})
    return tiny_config.model_copy(update={"data": data})


def test_a_config_error_on_a_secret_field_masks_its_value():
    from kd_core.config import ConfigError
    from kd_core.job import validate_config

    with pytest.raises(ConfigError) as raised:
        validate_config({"storage": {"s3": {"secret_access_key": [PASSWORD], "access_key_id": {"id": TOKEN}}}})
    message = str(raised.value)
    assert "storage.s3.secret_access_key" in message and "storage.s3.access_key_id" in message
    assert PASSWORD not in message and TOKEN not in message


def test_a_config_error_names_a_url_without_its_password():
    from kd_core.config import ConfigError
    from kd_core.job import validate_config

    with pytest.raises(ConfigError) as raised:
        validate_config({"data": {"files": SECRET_DATA_URLS[0]}})  # a string where a list belongs
    assert "data.files" in str(raised.value) and "data.example.com/corpus/part-0.jsonl" in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_bad_input_errors_and_failed_step_causes_mask_url_credentials():
    from kd_core.kubeflow.steps import one_line_cause
    from kd_core.storage import StorageError

    assert_no_secret(str(StorageError(f"data.files: cannot read {' '.join(SECRET_DATA_URLS)}")), "a StorageError")
    assert_no_secret(one_line_cause(RuntimeError(f"GET {' '.join(SECRET_DATA_URLS)} returned 500")), "a step's failure cause")


def test_console_messages_mask_url_credentials(monkeypatch, capsys):
    from kd_core import progress

    monkeypatch.setattr(progress, "_QUIET", False)
    progress.say(f"prep: reading {' '.join(SECRET_DATA_URLS)}")
    assert_no_secret(capsys.readouterr().err, "a console message")


def test_an_object_store_url_with_credentials_is_refused_without_showing_them(capsys):
    """S3 takes no credentials in a URL (botocore would send `KEY:SECRET@bucket` as the bucket name
    and print it in its error): the config names the field, masked, and says where they go."""
    from kd_core.cli import main

    for override in (f"storage.root=s3://AKIAEXAMPLE:{PASSWORD}@bucket/runs", f"teacher.path=s3://AKIAEXAMPLE:{PASSWORD}@bucket/teacher"):
        assert main(["validate", "configs/tiny.yaml", override]) == 2
        printed = capsys.readouterr().err
        field = override.split("=", 1)[0]
        assert f"{field}: an object-store URL cannot carry credentials (s3://***@bucket/" in printed and "AWS_ACCESS_KEY_ID" in printed
        assert PASSWORD not in printed and "AKIAEXAMPLE" not in printed


def test_a_manifest_on_the_store_masks_url_credentials(tmp_path):
    from kd_core.config import StorageConfig
    from kd_core.manifest import Manifest, write_manifest
    from kd_core.storage import Store

    store = Store(StorageConfig(root=str(tmp_path / "store")))
    manifest = Manifest(
        stage="prep", key="k" * 20, config_hash="h", config={"files": SECRET_DATA_URLS}, inputs={}, outputs={},
        details={"files": [{"url": url, "size": 1} for url in SECRET_DATA_URLS]},
    )
    write_manifest(store, manifest)
    written = store.read_bytes(f"{manifest.folder}/manifest.json").decode()
    assert_no_secret(written, "the manifest")
    assert json.loads(written)["key"] == "k" * 20


def test_mlflow_params_of_a_training_run_mask_url_credentials(tiny_config):
    from mlflow import MlflowClient

    from kd_core.config import public_dict
    from kd_core.train.tracking import MlflowLogger, TrainingRun

    job = job_with_secret_urls(tiny_config)
    logger = MlflowLogger(TrainingRun.for_job(job.registry, "secret-urls", public_dict(job)))
    logger.start()
    logger.end()
    params = MlflowClient(job.registry.tracking_uri).get_run(logger.run_id).data.params
    assert_no_secret(json.dumps(params), "the MLflow params")


def test_the_compiled_pipeline_masks_url_credentials(tiny_config, tmp_path):
    from pipelines.engines import compile_pipeline

    path = compile_pipeline(job_with_secret_urls(tiny_config), tmp_path / "pipeline.yaml")
    assert_no_secret(path.read_text(), "the compiled pipeline")


def test_redact_masks_only_credentials():
    from kd_core.redaction import redact

    assert redact("s3://AKIA:se/cr@t@bucket/x.bin") == "s3://***@bucket/x.bin"  # a secret key may hold / and @
    assert redact("https://h/p?Signature=a%2Fb&AWSAccessKeyId=AK&Expires=9") == "https://h/p?Signature=***&AWSAccessKeyId=***&Expires=9"
    assert redact("https://acct.blob.core.windows.net/c/f?sv=2024&sig=abc") == "https://acct.blob.core.windows.net/c/f?sv=2024&sig=***"
    for untouched in ("s3://bucket/key@v1.bin", "http://127.0.0.1:5000/api/2.0", "distill.train.max_steps=50", "a=b&c=d"):
        assert redact(untouched) == untouched
