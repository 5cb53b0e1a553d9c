"""Shared fixtures: real services started by the tests themselves.

- `s3_endpoint`: a moto S3 server in its own process on loopback (a real S3 HTTP API), with
  throwaway credentials in the environment, as s3fs expects them.
- `tiny_config`: the shipped tiny job config, with storage and MLflow under a temporary folder.
- Ray is started by the code under test (a local cluster) and shut down after the session.

Run everything with `make test`, or one file with `.venv/bin/python -m pytest tests/test_x.py`.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:
    # `make test` runs two pytest-xdist workers (whole files each): give each its own download
    # cache, so two files never fill the same cache folder at once.
    cache = Path(os.environ.get("KDFLOW_CACHE", Path.home() / ".cache" / "kdflow"))
    os.environ["KDFLOW_CACHE"] = str(cache / os.environ["PYTEST_XDIST_WORKER"])

from kd_core.devtools import loopback_s3, migrated_sqlite_uri  # noqa: E402 (after the cache is chosen)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("KDFLOW_QUIET", "1")


LONGEST_FILES = ("test_checkpoints.py", "test_benchmarks.py", "test_image.py", "test_faults.py", "test_kubeflow.py", "test_on_policy.py", "test_end_to_end.py")
"""The test files that take longest, longest first (their tests' seconds added up in a `make test`
on 2 cores, docs/benchmarks.md issue 26: 360, 230, 190, 150, 145, 115, 105; every other file
takes under 70)."""


def pytest_collection_modifyitems(config, items):
    """The longest files first. `make test` hands whole files to its two workers in collection
    order (`--dist loadfile --no-loadscope-reorder`), so a long file never starts last and keeps
    one worker busy while the other idles: xdist's own order (most tests first) started the image
    replay, two tests and 3 minutes, last. The rest keep pytest's order."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on loopback; credentials are fake and only valid for it."""
    with loopback_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket; returns its name."""
    import s3fs

    name = f"kdflow-test-{uuid.uuid4().hex[:16]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(name)
    return name


@pytest.fixture
def tiny_config(tmp_path):
    """The tiny job config with its storage and MLflow database inside tmp_path."""
    from kd_core.job import load_config

    return load_config(
        REPO / "configs" / "tiny.yaml",
        [f"storage.root={tmp_path / 'store'}", f"registry.tracking_uri={migrated_sqlite_uri(tmp_path / 'mlflow.db')}"],
    )


@pytest.fixture(autouse=True)
def _restore_mlflow_client_settings():
    """`kdflow` commands run in-process set MLflow's retry settings in this process's environment
    (kd_core.train.tracking_probe.fail_fast_mlflow_client); later tests start from the original."""
    from kd_core.train.tracking_probe import MLFLOW_CLIENT_DEFAULTS

    saved = {name: os.environ.get(name) for name in MLFLOW_CLIENT_DEFAULTS}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def ray_runtime():
    """This pytest worker's one local Ray (2 CPUs), for the tests that use Ray directly; the
    pipeline's own `ensure_ray` finds it started and joins it. Shut down at the session's end."""
    from kd_core.config import ComputeConfig
    from kd_core.train.ray_glue import ensure_ray

    ensure_ray(ComputeConfig(num_cpus=2))


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end():
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URL of a real MLflow tracking server (SQLite backend) on loopback, for the whole session."""
    from kd_core.devtools import loopback_mlflow

    with loopback_mlflow(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url
