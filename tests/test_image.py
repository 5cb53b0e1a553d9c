"""The cluster image has what the cluster runs, proved without a container engine.

`test_the_image_install_replayed_into_a_fresh_venv_runs_every_cluster_entry_point` replays the
image's Python install (infra/install-python.sh, the script both stages of infra/Dockerfile run)
into a fresh virtual environment, with the CPU torch of constraints.txt standing in for the CUDA
build: the builder stage's COPY lines, read from the Dockerfile, fill a build folder; the builder
phase makes the wheels there (kdflow[cluster] and every dependency, pinned by constraints.txt),
the runtime phase installs them with no index. In that venv it then
imports every module that kdflow's own code imports (its packages, components/, pipelines/ and
every third-party module named in them, lazy imports inside functions included: what a
component, the RayJob entrypoint `python -m kd_core.kubeflow.steps` and `kdflow tune` load) and
what the MLflow server of infra/k8s/mlflow.yaml loads, runs `ray job submit --help` (job
submission needs ray[default]) and `kdflow tune --help`, and checks that kdflow is installed
from a wheel, not from this checkout, and finds the RayJob templates through KDFLOW_INFRA_DIR as
the image sets it.

It costs a few minutes: a 2 GB venv. The third-party wheels of the builder phase are kept in
~/.cache/kdflow/image-wheels/<hash of constraints.txt, pyproject.toml and the install script>,
and a run that finds them builds only kdflow's own wheel, anew from this tree, with no package
index and no second resolution (the runtime phase still resolves kdflow[cluster] among the
wheels). A quicker test runs the venv phase as the image does (byte-compiling) on a wheelhouse of
uv and a one-module stand-in for kdflow. The other tests check the Dockerfile's shape: two
stages, no compiler in the one that runs, no editable or --no-deps install, a non-root user.

    PYTHONPATH=$PWD python -m pytest tests/test_image.py -q
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "infra" / "Dockerfile"
INSTALL_SCRIPT = REPO / "infra" / "install-python.sh"
PROJECT_PACKAGES = ("kd_core", "components", "pipelines")
WHEEL_CACHE = Path.home() / ".cache" / "kdflow" / "image-wheels"
"""Third-party wheels of earlier replays, one folder per set of pins."""
SERVER_MODULES = ("mlflow.server", "mlflow.server.auth", "psycopg2", "boto3")
"""What `mlflow server --app-name basic-auth` with PostgreSQL and S3 artifacts loads (infra/k8s/mlflow.yaml)."""


def cpu_torch_version() -> str:
    (pin,) = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch==")]
    version = pin.removeprefix("torch==")
    assert version.endswith("+cpu"), f"constraints.txt pins {pin}: the replay must never pull a CUDA build"
    return version


def modules_the_code_imports() -> list[str]:
    """Every module of kdflow's packages, and every absolute import in them (lazy ones too)."""
    modules, standard = set(), sys.stdlib_module_names
    for package in PROJECT_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).with_suffix("")
            modules.add(".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts))
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                modules.update(name for name in names if name.split(".")[0] not in standard)
    return sorted(modules)


def cached_wheels() -> Path:
    digest = hashlib.sha256()
    for name in ("constraints.txt", "pyproject.toml", "infra/install-python.sh"):
        digest.update((REPO / name).read_bytes())
    return WHEEL_CACHE / digest.hexdigest()[:16]


def copy_wheels(source: Path, destination: Path, *, with_kdflow: bool) -> None:
    """Hard links where the filesystem allows (the wheelhouse is 500 MB), else copies."""
    destination.mkdir(parents=True, exist_ok=True)
    for wheel in source.iterdir():
        if wheel.name.startswith("kdflow-") and not with_kdflow:
            continue
        try:
            os.link(wheel, destination / wheel.name)
        except OSError:
            shutil.copy2(wheel, destination / wheel.name)


def keep_wheels(wheels: Path, cache: Path) -> None:
    staging = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    copy_wheels(wheels, staging, with_kdflow=False)
    try:
        staging.rename(cache)
    except OSError:  # another run kept them first
        shutil.rmtree(staging, ignore_errors=True)


def uv_left_behind(venv: Path, scratch: Path) -> list[Path]:
    """What of uv a venv phase left: its program or package in the venv, or anything in the
    phase's temporary folder `scratch` (TMPDIR), where uv ran from."""
    return [*venv.glob("bin/uv"), *venv.glob("lib/python*/site-packages/uv-*"), *scratch.iterdir()]


def replay_environment() -> dict[str, str]:
    """This process's environment minus what would let the venv see this checkout, minus uv's
    settings (the image build has none), and minus PYTHONDONTWRITEBYTECODE: bytecode is compiled
    on first import in the test (the image compiles all of it at install), and written, so the
    commands after the first import reuse it."""
    hidden = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    environment = {key: value for key, value in os.environ.items() if key not in hidden and not key.startswith("UV_")}
    # pip keeps its cache, so a second run reuses the wheels the first one fetched.
    environment.update(PIP_NO_COMPILE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", KDFLOW_QUIET="1")
    return environment


def run(command: list[str], environment: dict[str, str], cwd: Path, timeout: float = 900) -> str:
    result = subprocess.run(command, env=environment, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    failed = f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, failed
    return result.stdout


IMPORT_EVERYTHING = """
import importlib, json, sys
failed = {}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception as err:
        failed[name] = f"{type(err).__name__}: {err}"
import kd_core, torch
from kd_core.kubeflow.isolation import POLICY_TEMPLATE_NAME, load_policy_template
from kd_core.kubeflow.rayjob import load_template, template_path
templates = [load_template()["kind"], load_policy_template(template_path().with_name(POLICY_TEMPLATE_NAME))["kind"]]
print(json.dumps({"failed": failed, "kd_core": kd_core.__file__, "torch": torch.__version__, "templates": templates}))
"""


def replay_builder_copies(source: Path) -> None:
    """Fill `source` as the builder stage's COPY lines fill its working folder."""
    builder, _ = dockerfile_stages()
    for line in builder:
        if not line.startswith("COPY ") or "--from" in line:
            continue
        *sources, target = line.split()[1:]
        for name in sources:
            origin = REPO / name
            destination = source / target / origin.name if target.endswith("/") else source / target
            destination.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(origin, destination, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, destination)


@pytest.mark.slow
def test_the_image_install_replayed_into_a_fresh_venv_runs_every_cluster_entry_point(tmp_path):
    import json

    environment = replay_environment()
    source, wheels, venv, elsewhere = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    replay_builder_copies(source)
    # The builder phase, with this interpreter's pip; the runtime phase makes its own venv.
    builder = {**environment, "PYTHON": sys.executable, "TORCH_VERSION": cpu_torch_version()}
    builder.pop("TORCH_INDEX", None)  # the pip configuration of this machine finds the CPU wheel
    cache = cached_wheels()
    if cache.is_dir():  # every wheel but kdflow's, resolved when kept: only kdflow's is built now
        copy_wheels(cache, wheels, with_kdflow=False)
        builder.update(PIP_NO_INDEX="1", PIP_NO_DEPS="1")  # pip's resolver took 24 s to find them again
    run(["sh", str(source / "infra" / "install-python.sh"), "wheels", str(source), str(wheels)], builder, elsewhere)
    if not cache.is_dir():
        keep_wheels(wheels, cache)
    # Without byte-compiling the installed modules (UV_COMPILE_BYTECODE=0): the same files are
    # installed and imported, the image's own build compiles them, and the replay takes much less
    # time.
    scratch = tmp_path / "scratch"  # the phase's temporary folders: uv's must be gone after it
    scratch.mkdir()
    runtime = {**environment, "PYTHON": sys.executable, "UV_COMPILE_BYTECODE": "0", "TMPDIR": str(scratch)}
    run(["sh", str(INSTALL_SCRIPT), "venv", str(venv), str(wheels)], runtime, elsewhere)
    python = str(venv / "bin" / "python")
    assert not uv_left_behind(venv, scratch), f"the venv phase left uv behind: {uv_left_behind(venv, scratch)}"

    wanted = [*modules_the_code_imports(), *SERVER_MODULES]
    image = {**environment, "KDFLOW_INFRA_DIR": str(REPO / "infra")}  # the image's COPY infra /opt/kdflow/infra
    report = json.loads(run([python, "-c", IMPORT_EVERYTHING, json.dumps(wanted)], image, elsewhere).splitlines()[-1])
    assert report["failed"] == {}, f"modules the cluster runs that the image cannot import: {report['failed']}"
    assert report["kd_core"].startswith(str(venv)), f"kd_core imported from {report['kd_core']}, not the venv's wheel"
    assert report["torch"] == cpu_torch_version()
    assert report["templates"] == ["RayJob", "NetworkPolicy"]
    assert "usage" in run([str(venv / "bin" / "ray"), "job", "submit", "--help"], environment, elsewhere).lower()
    assert "tune.space" in run([str(venv / "bin" / "kdflow"), "tune", "--help"], environment, elsewhere)
    run([python, "-m", "pip", "check"], environment, elsewhere)


@pytest.mark.slow
def test_the_venv_phase_byte_compiles_by_default_and_leaves_nothing_of_uv(tmp_path):
    """The runtime phase as the image runs it (byte-compiling, the default), on a wheelhouse of
    the pinned uv and a one-module stand-in for kdflow: the module's bytecode is installed, and
    neither the venv nor the temporary folders keep uv."""
    import zipfile

    wheels, venv, scratch = tmp_path / "wheels", tmp_path / "venv", tmp_path / "scratch"
    wheels.mkdir(), scratch.mkdir()
    (uv_pin,) = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("uv==")]
    environment = replay_environment()
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(wheels), uv_pin],
        environment, tmp_path)
    (wheels / "constraints.txt").write_text((REPO / "constraints.txt").read_text())
    info = "kdflow-0.1.0.dist-info"
    metadata = "Metadata-Version: 2.1\nName: kdflow\nVersion: 0.1.0\nProvides-Extra: cluster\n"
    with zipfile.ZipFile(wheels / "kdflow-0.1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("kdflow_stand_in.py", "ANSWER = 42\n")
        wheel.writestr(f"{info}/METADATA", metadata)
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    phase = {**environment, "PYTHON": sys.executable, "TMPDIR": str(scratch), "PIP_NO_INDEX": "1"}
    run(["sh", str(INSTALL_SCRIPT), "venv", str(venv), str(wheels)], phase, tmp_path)
    (site,) = venv.glob("lib/python*/site-packages")
    assert list((site / "__pycache__").glob("kdflow_stand_in.*.pyc")), "the default install did not byte-compile"
    assert not uv_left_behind(venv, scratch), uv_left_behind(venv, scratch)


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), one list per FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("FROM "):
            stages.append([])
        if line.strip() and not line.lstrip().startswith("#") and stages:
            stages[-1].append(line.strip())
    return stages


def test_the_dockerfile_builds_wheels_in_one_stage_and_runs_from_a_stage_without_a_compiler():
    builder, runtime = dockerfile_stages()
    assert any("install-python.sh wheels" in line for line in builder)
    assert any("install-python.sh venv" in line and "--mount=type=bind,from=builder" in line for line in runtime)
    run_lines = " ".join(line for line in runtime if line.startswith("RUN "))
    for compiler in ("build-essential", "gcc", "g++", "-dev ", "clang"):
        assert compiler not in run_lines, f"the runtime stage installs {compiler}"
    whole = DOCKERFILE.read_text()
    assert "--no-deps" not in whole and " -e " not in whole and "--editable" not in whole
    assert "chown" not in whole, "the code stays root-owned: nothing is handed to the runtime user"
    assert [line for line in runtime if line.startswith("USER ")][-1] == "USER 10001:10001"
