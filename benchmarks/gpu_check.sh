#!/usr/bin/env bash
# The distill stage's GPU check (benchmarks/gpu_check.py): kdflow's DeepSpeed trainer against a
# plain DeepSpeed step, then the loss benchmark on CUDA. About 4 minutes on one H100/H200.
#
# The GPU image has torch, transformers, pyarrow and fsspec but not deepspeed or pydantic, and no
# network. Prepare their wheels here once (they travel with the working tree, in .whl/):
#     bash benchmarks/gpu_check.sh --prepare
# then, on the GPU machine, from the repository root:
#     bash benchmarks/gpu_check.sh              [more gpu_check.py options]
# and on any CPU machine, the tiny version the tests run:
#     bash benchmarks/gpu_check.sh --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=.whl

version_of() { grep -i "^$1==" constraints.txt | cut -d= -f3; }

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$WHEELS"
    # DeepSpeed as a pure-Python wheel: its ops are JIT-built on first use where they are needed.
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==$(version_of deepspeed)"
    for package in hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions; do
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" "$package==$(version_of "$package")"
    done
    ls -la "$WHEELS"
    exit 0
fi

if ! "$PYTHON" -c "import deepspeed, pydantic" 2>/dev/null; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "deepspeed/pydantic missing: run 'bash benchmarks/gpu_check.sh --prepare' where pip works and carry .whl/" >&2; exit 1; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kdflow-site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/kdflow-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 KDFLOW_QUIET=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
