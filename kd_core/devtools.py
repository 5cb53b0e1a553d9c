"""Development helpers shared by the tests and the benchmarks (not used by the pipeline).

`loopback_s3()` starts moto's S3 server in its own process on 127.0.0.1, a real S3 HTTP API that
s3fs talks to exactly as it talks to AWS or MinIO, with throwaway credentials in the environment.
moto is a test dependency (`pip install -e '.[test]'`). `loopback_mlflow(folder)` starts a real
MLflow tracking server (`mlflow server`, SQLite backend) on 127.0.0.1. `tensor_bytes()` measures
the peak bytes of the tensors a block of torch code allocates.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kdflow-test-key", "AWS_SECRET_ACCESS_KEY": "kdflow-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
def loopback_mlflow(folder: Path, start_timeout: float = 120) -> Iterator[str]:
    """Yields the URL of a real MLflow tracking server (SQLite backend, artifacts served from
    `folder`) on loopback; stops it afterwards."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "server.log", "wb")
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
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
