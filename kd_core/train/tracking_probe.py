"""Is `registry.tracking_uri` usable? Asked once, in seconds, before any stage work.

`probe_tracking_uri(uri)` raises `TrackingServerError` (an `InputError`: the CLI prints its one
line and exits 2) when:

- an http(s) URI has no MLflow server behind it: the host does not resolve, refuses the
  connection or does not answer within `timeout` seconds; or it answers, but not as MLflow's REST
  API; or it refuses kdflow's credentials (HTTP 401/403). One GET of
  `{uri}/api/2.0/mlflow/experiments/get-by-name` decides: MLflow answers it with the experiment
  (200) or with a JSON `error_code` (404 when the experiment does not exist yet). Credentials come
  from the environment as MLflow reads them (`MLFLOW_TRACKING_TOKEN`, or
  `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`) and never appear in a message;
- a `sqlite:///` URI names a database whose folder cannot be created or written.

Other schemes (databricks, file, postgresql, ...) are left to MLflow, and so is a server the
probe cannot speak to as MLflow's client would (client certificates, AWS SigV4 signing, an auth
plugin: `MLFLOW_TRACKING_CLIENT_CERT_PATH`, `MLFLOW_TRACKING_AWS_SIGV4`, `MLFLOW_TRACKING_AUTH`).
`KDFLOW_SKIP_TRACKING_PROBE=1` skips the probe altogether.

`fail_fast_mlflow_client()` caps MLflow's own HTTP retries and timeout for kdflow's processes
(unless the user set them), so a server that goes away mid-run fails a step in seconds, not after
MLflow's default 7 retries with exponential back-off (over 4 minutes).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from kd_core.errors import InputError

PROBE_TIMEOUT_S = 5.0
"""Seconds the probe waits for the server to connect and answer."""
MLFLOW_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
"""kdflow's MLflow client settings where the user set none: 2 retries (2 s + 4 s of back-off,
against MLflow's 7 retries over minutes); 60 s per request (MLflow's 120 s), still enough for a
proxied artifact upload of a large student."""
_FIELD = "registry.tracking_uri"


class TrackingServerError(InputError):
    """`registry.tracking_uri` cannot be used: unreachable, not MLflow, refusing credentials, or an
    unwritable SQLite folder."""


def fail_fast_mlflow_client() -> None:
    """Set `MLFLOW_CLIENT_DEFAULTS` in this process's environment where unset (subprocesses and
    Ray workers started afterwards inherit them)."""
    for name, value in MLFLOW_CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


_UNPROBED_AUTH = ("MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_TRACKING_AUTH")
"""Ways MLflow's client authenticates that the probe does not reproduce: such servers are not probed."""


def probe_tracking_uri(uri: str, experiment: str = "Default", timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise `TrackingServerError` unless `uri` is usable (see the module docstring)."""
    if _true(os.environ.get("KDFLOW_SKIP_TRACKING_PROBE")):
        return
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https") and any(os.environ.get(name) for name in _UNPROBED_AUTH):
        return
    if scheme in ("http", "https"):
        _probe_server(uri, experiment, timeout)
    elif scheme == "sqlite":
        _probe_sqlite_folder(uri)


def _probe_server(uri: str, experiment: str, timeout: float) -> None:
    shown = redact(uri)
    query = urllib.parse.urlencode({"experiment_name": experiment})
    request = urllib.request.Request(f"{_without_userinfo(uri).rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}")
    for header, value in _auth_headers(uri).items():
        request.add_unredirected_header(header, value)  # never sent on to where a redirect points
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=_tls_context()) as response:
            status, body = response.status, response.read(65536)
    except urllib.error.HTTPError as answer:
        status, body = answer.code, answer.read(65536)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise TrackingServerError(
            f"{_FIELD}: no MLflow server at {shown} ({_unreachable_reason(err, timeout)}); start the server, "
            f"fix the URI, or use sqlite:///runs/mlflow.db for a local file"
        ) from None
    _check_answer(shown, status, body)


def _check_answer(shown: str, status: int, body: bytes) -> None:
    if status in (401, 403):
        raise TrackingServerError(
            f"{_FIELD}: the MLflow server at {shown} refused kdflow's credentials (HTTP {status}); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account it accepts"
        )
    if not _is_mlflow_answer(status, body):
        raise TrackingServerError(
            f"{_FIELD}: {shown} answered HTTP {status}, but not as an MLflow tracking server "
            "(no MLflow REST API under /api/2.0/mlflow); point it at the server's root URL, e.g. http://mlflow:5000"
        )


def _is_mlflow_answer(status: int, body: bytes) -> bool:
    """MLflow answers get-by-name with `{"experiment": ...}` or an error object with `error_code`."""
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    if not isinstance(answer, dict):
        return False
    return "experiment" in answer if status == 200 else "error_code" in answer


def _unreachable_reason(err: Exception, timeout: float) -> str:
    reason = getattr(err, "reason", err)
    if isinstance(reason, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed: {reason.reason or reason}"
    if isinstance(reason, http.client.HTTPException):
        return f"the answer is not HTTP ({type(reason).__name__})"
    return str(reason) or type(reason).__name__


def _auth_headers(uri: str) -> dict[str, str]:
    """The Authorization header MLflow's client would send: from the same environment variables,
    else from a user name and password in the URI itself."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    parsed = urllib.parse.urlsplit(uri)
    if not (user and password) and parsed.username:
        user, password = urllib.parse.unquote(parsed.username), urllib.parse.unquote(parsed.password or "")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def _tls_context() -> ssl.SSLContext:
    """TLS as MLflow's client is told: a CA bundle (`MLFLOW_TRACKING_SERVER_CERT_PATH`), or no
    verification (`MLFLOW_TRACKING_INSECURE_TLS=true`)."""
    if _true(os.environ.get("MLFLOW_TRACKING_INSECURE_TLS")):
        return ssl._create_unverified_context()
    return ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)


def _without_userinfo(uri: str) -> str:
    parsed = urllib.parse.urlsplit(uri)
    host = parsed.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parsed.port}" if parsed.port else "")
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def redact(uri: str) -> str:
    """`uri` without a user name or password in it, for messages."""
    return _without_userinfo(uri) if "@" in urllib.parse.urlsplit(uri).netloc else uri


def _probe_sqlite_folder(uri: str) -> None:
    database = uri.removeprefix("sqlite:///")
    if database == uri or database in ("", ":memory:"):  # sqlite:// alone is an in-memory database
        return
    path = Path(database).expanduser().resolve()
    existing = next(parent for parent in path.parents if parent.exists())
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    elif path.exists() and not os.access(path, os.W_OK):
        problem = "the file is not writable"
    else:
        return
    raise TrackingServerError(
        f"{_FIELD}: cannot write the MLflow database {database} ({problem}); choose a writable folder, e.g. sqlite:///runs/mlflow.db"
    )
