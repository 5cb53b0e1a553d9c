#!/bin/sh
# The image's Python install, in the two phases of infra/Dockerfile's two stages. The Dockerfile
# runs this file and tests/test_image.py replays it into a fresh virtual environment, so what the
# image installs and what the test proves cannot drift apart.
#
#   install-python.sh wheels SOURCE WHEELHOUSE
#       (builder stage, which has a compiler) every wheel the image needs, into WHEELHOUSE:
#       torch==$TORCH_VERSION (from $TORCH_INDEX when set), then kdflow[cluster] built from the
#       SOURCE tree with its dependencies, all pinned by SOURCE/constraints.txt with its torch
#       line replaced by $TORCH_VERSION (constraints.txt pins the CPU build laptops and CI use),
#       and the pinned uv that the runtime phase installs with.
#   install-python.sh venv VENV WHEELHOUSE
#       (runtime stage: no compiler, no index) the virtual environment VENV with kdflow[cluster]
#       installed, not editable, from those wheels and nothing else, byte-compiled. uv installs
#       them (without byte-compiling, 10 s here where pip took 53 s for the same 2 GB); it runs
#       from a folder outside VENV that is removed afterwards, so the image does not keep it, and
#       reads no uv configuration file. UV_COMPILE_BYTECODE=0 (exactly "0") skips the
#       byte-compiling (the test that replays this file does).
#
# $PYTHON (default python3.11) runs pip and makes the venv; pip's own settings (PIP_* variables,
# pip.conf) apply to the builder phase and to installing uv, so a test can point pip at wheels
# already on disk. Wheels already in WHEELHOUSE are used as they are (a test keeps one between
# runs and sets PIP_NO_INDEX=1).
set -eu

PYTHON="${PYTHON:-python3.11}"
phase="$1"
case "$phase" in
  wheels)
    source_dir="$2" wheelhouse="$3"
    : "${TORCH_VERSION:?set TORCH_VERSION, e.g. 2.13.0+cu128}"
    mkdir -p "$wheelhouse"
    sed "s/^torch==.*/torch==${TORCH_VERSION}/" "$source_dir/constraints.txt" > "$wheelhouse/constraints.txt"
    # torch alone first: its index (PyTorch's CUDA builds) is not the index of everything else.
    # shellcheck disable=SC2086 # TORCH_INDEX is one URL or nothing
    "$PYTHON" -m pip wheel --wheel-dir "$wheelhouse" --find-links "$wheelhouse" \
      ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==${TORCH_VERSION}"
    "$PYTHON" -m pip wheel --wheel-dir "$wheelhouse" --find-links "$wheelhouse" \
      --constraint "$wheelhouse/constraints.txt" "${source_dir}[cluster]" uv
    ;;
  venv)
    venv="$2" wheelhouse="$3"
    "$PYTHON" -m venv "$venv"
    uv_folder="$(mktemp -d)"
    trap 'rm -rf "$uv_folder"' EXIT
    trap 'exit 1' INT TERM HUP  # sh runs the EXIT trap on exit, not on a signal
    "$venv/bin/python" -m pip install --quiet --no-index --find-links "$wheelhouse" \
      --constraint "$wheelhouse/constraints.txt" --target "$uv_folder" uv
    compile=--compile-bytecode
    [ "${UV_COMPILE_BYTECODE:-1}" = 0 ] && compile=
    # shellcheck disable=SC2086 # compile is one flag or nothing
    "$uv_folder/bin/uv" pip install --no-config --python "$venv/bin/python" --no-index --no-cache $compile \
      --find-links "$wheelhouse" --constraint "$wheelhouse/constraints.txt" "kdflow[cluster]"
    ;;
  *)
    echo "usage: $0 wheels SOURCE WHEELHOUSE | venv VENV WHEELHOUSE" >&2
    exit 2
    ;;
esac
