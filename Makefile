# kdflow developer entry points. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test setup clean-runs lock

demo: $(STAMP)  ## run the whole pipeline on the embedded default (configs/demo.yaml)
	$(BIN)/kdflow run configs/demo.yaml

test: $(STAMP)  ## run the test suite
	$(BIN)/python -m pytest

setup: $(STAMP)

# Pinned set-up: every package at the version in constraints.txt. torch is pinned to the CPU
# build (2.13.0+cpu), so set-up never pulls a multi-GB CUDA build onto a CPU machine.
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

lock:  ## refresh constraints.txt from the current .venv (after changing dependencies)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^kdflow' > constraints.txt

clean-runs:  ## delete every local artifact, cache and MLflow record of the demo
	rm -rf runs
