"""`registry.tracking_uri` is probed before any stage work, and `kdflow validate --check-inputs`.

- A tracking server that is down (nothing listens on the port; a host that does not resolve) stops
  `kdflow run` (either engine), `distill` and `tune` at once with exit 2 and one line naming
  `registry.tracking_uri`, before any stage wrote to storage; `validate --check-inputs` reports
  the same way.
- A real MLflow server (the `mlflow_server` fixture) passes the probe.
- A server that accepts the connection but never answers is named after the probe's timeout.
- An HTTP server that is not MLflow, and one that refuses the credentials (401), are named as
  such. Both are small loopback stand-ins: they are exactly the kind of server the probe must
  reject (an MLflow server with an auth app needs extra packages this suite does not install).
  The credentials the probe sends come from MLFLOW_TRACKING_USERNAME/PASSWORD and never reach
  the message.
- A SQLite URI whose folder cannot be created is named.
- kdflow's MLflow client gives up on a dead server in seconds, not MLflow's default of minutes.
- The tests' SQLite databases (`devtools.migrated_sqlite_uri`, copies of one MLflow migrated once)
  are MLflow stores of their own.

Run: .venv/bin/python -m pytest tests/test_tracking_probe.py
"""

from __future__ import annotations

import base64
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kd_core.cli import main
from kd_core.devtools import free_port, migrated_sqlite_uri
from kd_core.train.tracking_probe import MLFLOW_CLIENT_DEFAULTS, TrackingServerError, fail_fast_mlflow_client, probe_tracking_uri

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
FAST = 30
"""Seconds: far under the 4 min 18 s MLflow's retries took before; loose enough for a loaded machine."""


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("command", "host"),
    [
        (["run"], "127.0.0.1:{port}"),
        (["run"], "kdflow-no-such-host.invalid:5000"),
        (["run", "--engine", "kfp-local"], "127.0.0.1:{port}"),
        (["distill"], "127.0.0.1:{port}"),
        (["tune"], "127.0.0.1:{port}"),
    ],
)
def test_a_tracking_server_that_is_down_stops_the_command_before_any_stage(tmp_path, capsys, command, host):
    uri = "http://" + host.format(port=free_port()) + "/"
    started = time.monotonic()
    code = main([*command, TINY, f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={uri}"])
    seconds = time.monotonic() - started

    assert code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: registry.tracking_uri: no MLflow server at " + uri)
    assert "does not resolve" in line or "connection refused" in line
    assert not (tmp_path / "store").exists(), "the probe runs before any stage"
    assert seconds < FAST


def test_validate_check_inputs_names_a_tracking_server_that_is_down(capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["validate", TINY, f"registry.tracking_uri={uri}"]) == 0, "without the flag nothing is contacted"
    capsys.readouterr()
    assert main(["validate", "--check-inputs", TINY, f"registry.tracking_uri={uri}"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: registry.tracking_uri: no MLflow server at {uri} (connection refused)")


@pytest.mark.slow
def test_a_real_mlflow_server_passes_the_probe(mlflow_server, capsys):
    assert main(["validate", "--check-inputs", TINY, f"registry.tracking_uri={mlflow_server}"]) == 0
    out = capsys.readouterr().out
    assert f"registry.tracking_uri: {mlflow_server} is usable" in out and "valid" in out
    probe_tracking_uri(mlflow_server, "an-experiment-that-does-not-exist-yet")


class StandIn(BaseHTTPRequestHandler):
    """Answers every GET with `status` and `body`, and records the Authorization header."""

    status, body, seen_authorization = 404, b"<html>Not Found</html>", []

    def do_GET(self):
        type(self).seen_authorization.append(self.headers.get("Authorization"))
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    """Start a loopback HTTP server with a fresh `StandIn` subclass; yields (url, handler class)."""
    handler = type("Handler", (StandIn,), {"seen_authorization": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", handler
    server.shutdown()
    server.server_close()


def test_a_server_that_is_not_mlflow_is_named(stand_in):
    url, _ = stand_in
    with pytest.raises(TrackingServerError, match=r"answered HTTP 404, but not as an MLflow tracking server"):
        probe_tracking_uri(url)


def test_a_server_that_never_answers_is_named_after_the_timeout():
    import socket

    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(TrackingServerError, match=rf"no MLflow server at {url} \(no answer within 1 s\)"):
            probe_tracking_uri(url, timeout=1)


def test_refused_credentials_are_named_without_showing_them(stand_in, monkeypatch, capsys):
    url, handler = stand_in
    handler.status, handler.body = 401, b'{"error_code": "UNAUTHENTICATED"}'
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "kdflow-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pass")
    with_userinfo = url.replace("http://", "http://inline:inline-pass@")

    assert main(["validate", "--check-inputs", TINY, f"registry.tracking_uri={with_userinfo}"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"the MLflow server at {url} refused kdflow's credentials (HTTP 401)" in line
    assert "MLFLOW_TRACKING_USERNAME" in line
    assert "s3cret-pass" not in line and "inline-pass" not in line
    assert handler.seen_authorization == ["Basic " + base64.b64encode(b"kdflow-user:s3cret-pass").decode()]


def test_a_sqlite_database_under_a_file_is_named(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    database = tmp_path / "not-a-folder" / "runs" / "mlflow.db"
    with pytest.raises(TrackingServerError, match=r"registry.tracking_uri: cannot write the MLflow database .*is a file, not a folder"):
        probe_tracking_uri(f"sqlite:///{database}")
    probe_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'folder' / 'mlflow.db'}")  # creatable: fine


@pytest.mark.slow
def test_kdflow_mlflow_client_gives_up_on_a_dead_server_in_seconds(monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    for name in MLFLOW_CLIENT_DEFAULTS:  # as for a user who set neither (conftest restores them afterwards)
        monkeypatch.delenv(name, raising=False)
    fail_fast_mlflow_client()
    started = time.monotonic()
    with pytest.raises(MlflowException):
        MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}").search_experiments()
    assert time.monotonic() - started < FAST


def test_credentials_in_the_uri_are_sent_when_the_environment_has_none_and_the_probe_can_be_skipped(stand_in, monkeypatch, capsys):
    url, handler = stand_in
    handler.status, handler.body = 401, b'{"error_code": "UNAUTHENTICATED"}'
    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with_userinfo = url.replace("http://", "http://inline:inline-pass@")
    assert main(["validate", "--check-inputs", TINY, f"registry.tracking_uri={with_userinfo}"]) == 2
    assert handler.seen_authorization == ["Basic " + base64.b64encode(b"inline:inline-pass").decode()]
    assert "inline-pass" not in capsys.readouterr().err

    monkeypatch.setenv("KDFLOW_SKIP_TRACKING_PROBE", "1")  # e.g. a server behind an auth plugin the probe cannot speak
    probe_tracking_uri(with_userinfo)
    assert len(handler.seen_authorization) == 1  # nothing was asked


@pytest.mark.slow  # MLflow's migrations, once
def test_each_copied_mlflow_database_is_a_store_of_its_own_at_mlflows_schema(tmp_path, monkeypatch):
    import sqlalchemy
    from mlflow import MlflowClient
    from mlflow.store.db.utils import _get_latest_schema_revision

    first, second = migrated_sqlite_uri(tmp_path / "a" / "mlflow.db"), migrated_sqlite_uri(tmp_path / "b" / "mlflow.db")
    with sqlalchemy.create_engine(first).connect() as connection:  # what MLflow checks before it would migrate
        assert connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar() == _get_latest_schema_revision()
    client = MlflowClient(first)
    run = client.create_run(client.create_experiment("copied"))
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    assert migrated_sqlite_uri(tmp_path / "a" / "mlflow.db") == first  # asked again: the database is kept, not replaced
    assert [point.value for point in client.get_metric_history(run.info.run_id, "loss")] == [0.5]
    monkeypatch.chdir(tmp_path / "b")  # the Default experiment is made by the database's first opener, where it runs
    (default,) = MlflowClient(second).search_experiments()
    assert default.name == "Default" and default.artifact_location.startswith(str(tmp_path / "b"))
