# `make demo` and `make test` work on a fresh clone: each first creates .venv and installs
# the pinned project (constraints.txt pins the whole environment).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast install system-deps clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Debian packages the tests use: Chromium renders report.html headless.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: chromium could not be installed; the browser test will be skipped"; \
	  else echo "note: install chromium to run the browser test of report.html"; fi; }

# The main job: the DVC pipeline on the demo data (demo data, prepare, both training
# stages, evaluation, registration and promotion in MLflow), then a summary.
demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	$(VENV)/bin/cladapter summary

# Tests in 2 processes (pytest-xdist). Every test has one tier (tests/conftest.py): unit,
# integration (real services, commands as processes), e2e (the whole pipeline).
# `make test` runs them all; `make test-fast` the unit tier alone, in about a minute.
# Each module's tests stay on one worker, in order (loadgroup; tests/conftest.py).
PYTEST := $(PY) -m pytest -q -n 2 --dist loadgroup

test: $(STAMP) system-deps
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m unit

clean:
	rm -rf outputs mlflow.db mlruns mlartifacts data/demo
