# kdflow developer entry points. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo chat test check setup pipelines clean-runs lock

demo: $(STAMP)  ## run the whole pipeline on the embedded default (configs/demo.yaml)
	$(BIN)/kdflow run configs/demo.yaml

chat: $(STAMP)  ## the chat recipe (configs/chat.yaml): the demo's teacher and student, fine-tuned and distilled on Python Q&A
	test -d runs/pretrained/python-teacher || $(BIN)/kdflow export configs/demo.yaml --step teacher --to runs/pretrained/python-teacher
	test -d runs/pretrained/python-student || $(BIN)/kdflow export configs/demo.yaml --step distill --to runs/pretrained/python-student
	$(BIN)/kdflow run configs/chat.yaml

# Two pytest workers: a third on two cores took 14% off the wall time but made the Ray Train
# tests three times slower, too near their own deadlines (docs/benchmarks.md, issue 26).
test:  ## check the import layers, then run the test suite (the two venvs are set up side by side; two pytest workers, whole files each; the 15 slowest tests listed)
	@$(MAKE) --no-print-directory -j2 $(STAMP) $(CHECKOV_STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m compileall -q -j 0 kd_core components pipelines benchmarks tests > /dev/null  # the .pyc files no process writes
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15

check: $(STAMP)  ## the fast tier while editing (about 2 minutes): the import layers, then every test not marked slow
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

pipelines: $(STAMP)  ## compile the Kubeflow DAGs to pipelines/compiled/ (committed; a test fails when they are stale)
	$(BIN)/kdflow compile configs/cluster.yaml --pipeline distill --output pipelines/compiled/distill_pipeline.yaml
	$(BIN)/kdflow compile configs/cluster.yaml --pipeline tune-distill --output pipelines/compiled/tune_distill_pipeline.yaml

setup: $(STAMP)

# Pinned set-up: every package at the version in constraints.txt. torch is pinned to the CPU
# build (2.13.0+cpu), so set-up never pulls a multi-GB CUDA build onto a CPU machine. The cluster
# extra is installed too, so that `make lock` keeps the pins the image needs.
# uv installs the pinned set, byte-compiled: 55-100 s here where pip took 215 s (docs/benchmarks.md,
# issue 26). The compiling is needed: where PYTHONDONTWRITEBYTECODE is set (it is on these
# machines) no process writes .pyc files, and every process and Ray worker would compile torch
# again on import. uv hard-links the files to its cache (copying them took 37 s more from a fresh
# clone): an edit inside a venv's site-packages reaches the cache. uv itself comes from pip,
# pinned by constraints.txt like everything else.
# uv reads no pip settings. It is handed the environment's (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
# the PIP_FIND_LINKS that exist, PIP_CERT; through the environment, so no credential in a URL is
# echoed) and picks from all indexes as pip does; where it still cannot install the pinned set
# (settings only in pip.conf, say), pip installs it as before.
UV := $(BIN)/uv
UV_ENV = env $${PIP_INDEX_URL:+UV_INDEX_URL="$$PIP_INDEX_URL"} $${PIP_EXTRA_INDEX_URL:+UV_EXTRA_INDEX_URL="$$PIP_EXTRA_INDEX_URL"} \
	$${PIP_CERT:+SSL_CERT_FILE="$$PIP_CERT"} UV_INDEX_STRATEGY=unsafe-best-match
UV_FIND_LINKS := $(foreach links,$(PIP_FIND_LINKS),$(if $(or $(findstring ://,$(links)),$(wildcard $(links))),--find-links $(links)))
# $(call install,VENV,WHAT): uv into VENV, else pip.
install = $(UV_ENV) $(UV) pip install --quiet --compile-bytecode --python $(1)/bin/python $(UV_FIND_LINKS) $(2) \
	|| { echo "uv could not install into $(1) (above): installing with pip" >&2; \
	     $(1)/bin/python -m pip install --quiet --disable-pip-version-check $(2); }
$(UV): constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt uv
	touch $(UV)

PROJECT := -c constraints.txt -e '.[test,cluster]'
$(STAMP): $(UV) pyproject.toml constraints.txt
	$(call install,$(VENV),$(PROJECT))
	touch $(STAMP)

# checkov (the infra/ security scan in tests/test_infra.py) pins its own dependency set, which
# clashes with the project's: it gets a venv of its own.
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-stamp
$(CHECKOV_STAMP): $(UV)
	test -d $(CHECKOV_VENV) || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(call install,$(CHECKOV_VENV),checkov==3.3.30)
	touch $(CHECKOV_STAMP)

lock:  ## refresh constraints.txt from the current .venv (after changing dependencies)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^kdflow' > constraints.txt

clean-runs:  ## delete every local artifact, cache and MLflow record of the demo
	rm -rf runs
