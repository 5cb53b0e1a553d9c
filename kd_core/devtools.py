"""Development helpers shared by the tests and the benchmarks (not used by the pipeline).

`loopback_s3()` starts moto's S3 server in its own process on 127.0.0.1, a real S3 HTTP API that
s3fs talks to exactly as it talks to AWS or MinIO, with throwaway credentials in the environment.
moto is a test dependency (`pip install -e '.[test]'`). `loopback_mlflow(folder)` starts a real
MLflow tracking server (`mlflow server`, SQLite backend) on 127.0.0.1. `migrated_sqlite_uri(path)`
gives a job an MLflow SQLite database without paying MLflow's migrations again. `tensor_bytes()`
measures the peak bytes of the tensors a block of torch code allocates.

`FaultyProxy(upstream)` is an HTTP proxy on 127.0.0.1 in front of such a server that injects the
faults of a flaky network and an overloaded store: a seeded share of requests answered 503 (or
500) without reaching the server, others held back, and every request matching a pattern failed.
It counts what it did, for the reliability figures. `KubernetesApiStandIn` answers the RayJob
endpoints of the Kubernetes API on loopback (no cluster runs here), for the real kubernetes client.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kdflow-test-key", "AWS_SECRET_ACCESS_KEY": "kdflow-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_migrated_template: Path | None = None


def migrated_sqlite_uri(database: Path) -> str:
    """`sqlite:///<database>`; where the file does not exist yet, it becomes a copy of an empty
    MLflow database that MLflow's own migrations made once in this process. A new database runs
    every migration of MLflow's history (1.5-3 s on 2 cores; the test suite makes a few dozen);
    MLflow opens one whose tables exist as it is. The template has no Default experiment (MLflow
    would have given it the artifact folder of this process's working directory): each database's
    first opener creates its own. An existing database is left as it is."""
    global _migrated_template
    if _migrated_template is None:
        import sqlite3

        from mlflow import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="kdflow-mlflow-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        template = folder / "empty.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates it
        with sqlite3.connect(template) as connection:
            connection.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
            connection.execute("DELETE FROM experiments WHERE experiment_id = 0")
        connection.close()
        _migrated_template = template
    if not database.exists():
        database.parent.mkdir(parents=True, exist_ok=True)
        staging = database.with_name(f".{database.name}.{os.getpid()}.{threading.get_ident()}")
        shutil.copyfile(_migrated_template, staging)
        os.replace(staging, database)
    return f"sqlite:///{database}"


@contextmanager
def loopback_s3(start_timeout: float = 60) -> Iterator[str]:
    """Yields the endpoint URL of a moto S3 server on loopback; stops it and restores the
    environment's credentials afterwards."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto S3 server did not start on loopback") from None
            time.sleep(0.2)
    saved = {key: os.environ.get(key) for key in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)
    try:
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def loopback_mlflow(folder: Path, start_timeout: float = 120, port: int | None = None) -> Iterator[str]:
    """Yields the URL of a real MLflow tracking server (SQLite backend, artifacts served from
    `folder`) on loopback (on `port`, e.g. to restart one); stops it afterwards."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    backend = migrated_sqlite_uri(folder / "mlflow.db")  # a restart keeps its database
    log = open(folder / "server.log", "wb")
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend, "--artifacts-destination", str(folder / "artifacts"),
    ]
    # Without MLflow's job runner (a huey consumer beside the server, for its GenAI jobs, which
    # kdflow does not use): it took seconds of the start and the stop.
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the MLflow server did not start; see {folder / 'server.log'}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@dataclass
class FaultCounts:
    requests: int = 0
    failed: int = 0
    delayed: int = 0
    delay_seconds: float = 0.0
    by_method: dict[str, int] = field(default_factory=dict)


class FaultyProxy:
    """A loopback HTTP proxy to `upstream` that fails `fail_share` of the requests with a 5xx
    (never reaching the server), holds back `delay_share` of them for `delay_s`, and fails every
    request whose `METHOD path` matches `fail_pattern` (a regex; None: none), or only the first
    `fail_times` of them. Seeded: the same
    requests meet the same faults. Use as a context manager; `url` is its endpoint, `counts` what
    it did."""

    def __init__(self, upstream: str, *, fail_share: float = 0.0, delay_share: float = 0.0, delay_s: float = 0.2,
                 fail_pattern: str | None = None, fail_times: int | None = None, seed: int = 0):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.fail_share, self.delay_share, self.delay_s = fail_share, delay_share, delay_s
        self.fail_pattern = re.compile(fail_pattern) if fail_pattern else None
        self.fail_times = fail_times
        self.random, self.lock, self.counts = random.Random(seed), threading.Lock(), FaultCounts()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultyProxy:
        threading.Thread(target=self.server.serve_forever, name="kdflow-faulty-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fate(self, method: str, path: str) -> str:
        """`fail`, `delay` or `pass` for one request (and count it)."""
        with self.lock:
            self.counts.requests += 1
            self.counts.by_method[method] = self.counts.by_method.get(method, 0) + 1
            draw = self.random.random()
            matched = bool(self.fail_pattern and self.fail_pattern.search(f"{method} {path}")) and self.fail_times != 0
            if matched and self.fail_times is not None:
                self.fail_times -= 1
            if matched or draw < self.fail_share:
                self.counts.failed += 1
                return "fail"
            if draw < self.fail_share + self.delay_share:
                self.counts.delayed += 1
                self.counts.delay_seconds += self.delay_s
                return "delay"
            return "pass"

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _relay(self) -> None:
                body = self._body()
                fate = proxy.fate(self.command, self.path)
                if fate == "fail":
                    status = 503 if proxy.random.random() < 0.5 else 500
                    code = "SlowDown" if status == 503 else "InternalError"
                    reply = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                if fate == "delay":
                    time.sleep(proxy.delay_s)
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {name: value for name, value in self.headers.items() if name.lower() not in ("transfer-encoding", "expect", "connection")}
                headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # A HEAD reply tells the object's size: pass the server's Content-Length through.
                self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        return Handler


class TensorBytes:
    """Bytes of the tensors that torch operations allocated inside a `tensor_bytes()` block."""

    live: int = 0
    """Still held (by the block's results, or leaked)."""
    peak: int = 0
    """The most held at any moment."""
    largest: int = 0
    """The largest single allocation."""


@contextmanager
def tensor_bytes() -> Iterator[TensorBytes]:
    """Counts, exactly and on any device, the storage every torch operation in the block allocates,
    until it is freed. Storages that existed before the block (model weights, inputs) and views of
    them count nothing. For tests and benchmarks: each operation passes through Python."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    counted = TensorBytes()
    sizes: dict[int, int] = {}  # id of a live storage -> the bytes it counts (0: not the block's)

    def track(storage, nbytes: int) -> None:
        sizes[id(storage)] = nbytes
        counted.live += nbytes
        counted.peak, counted.largest = max(counted.peak, counted.live), max(counted.largest, nbytes)
        weakref.finalize(storage, release, id(storage))

    def release(key: int) -> None:
        counted.live -= sizes.pop(key)

    class Meter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for tensor in tree_leaves((args, kwargs)):
                if isinstance(tensor, torch.Tensor) and id(tensor.untyped_storage()) not in sizes:
                    track(tensor.untyped_storage(), 0)
            result = func(*args, **(kwargs or {}))
            for tensor in tree_leaves(result):
                if isinstance(tensor, torch.Tensor) and id(tensor.untyped_storage()) not in sizes:
                    track(tensor.untyped_storage(), tensor.untyped_storage().nbytes())
            return result

    with Meter():
        yield counted


class KubernetesApiStandIn:
    """Answers the RayJob endpoints of the Kubernetes API (and the creation of NetworkPolicies) on
    loopback, for the real kubernetes client: the RayJobs created (each given a `uid`, and
    reported finished), the policies posted, `faults` (method -> (status, headers) answers to give
    first) and every request recorded as (method, path with query, Content-Type). `server.shutdown()`
    stops it."""

    PREFIX = "/apis/ray.io/v1/namespaces/kdflow/rayjobs"

    def __init__(self, faults=None):
        self.requests, self.faults, self.jobs = [], {method: list(answers) for method, answers in (faults or {}).items()}, {}
        self.policies: list[dict] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in [("Content-Type", "application/json"), *headers]:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_one(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                stand_in.requests.append((self.command, self.path, self.headers.get("Content-Type")))
                queue = stand_in.faults.get(self.command)
                if queue:
                    status, headers = queue.pop(0)
                    return self.reply(status, {"kind": "Status", "code": status, "message": "injected"}, headers)
                name = self.path.split("?")[0].removeprefix(self.PREFIX).strip("/")
                if self.command == "POST" and self.path.split("?")[0].endswith("/networkpolicies"):
                    stand_in.policies.append(body)  # the RayJob's NetworkPolicy (kd_core/kubeflow/isolation.py)
                    return self.reply(201, body)
                if self.command == "POST":
                    body["metadata"]["uid"] = f"uid-{body['metadata']['name']}"
                    stand_in.jobs[body["metadata"]["name"]] = {**body, "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}
                    return self.reply(201, body)
                if self.command == "GET" and not name:
                    return self.reply(200, {"kind": "RayJobList", "items": list(stand_in.jobs.values())})
                if self.command == "PATCH":
                    stand_in.jobs[name]["metadata"].update(body["metadata"])
                if self.command == "DELETE":
                    return self.reply(200, stand_in.jobs.pop(name))
                return self.reply(200, stand_in.jobs[name])

            do_GET = do_POST = do_PATCH = do_DELETE = handle_one

        Handler.PREFIX = self.PREFIX
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
