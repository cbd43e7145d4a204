# Two entry points: `make demo` (an audit on embedded defaults) and `make test` (lint + the whole suite);
# `make test-fast` skips the slow tests, `make mutation` runs mutation testing (docs/TESTING.md); both test targets
# run pytest on $(PYTEST_WORKERS) pytest-xdist workers.
# All build the virtual environment themselves; `make test` also starts Redis and PostgreSQL if needed.

PYTHON ?= python3
# pytest-xdist workers; PYTEST_WORKERS=0 runs the suite in one process (docs/TESTING.md).
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup)
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-fast mutation lint services bench venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/camaudit demo --workdir camaudit-demo

services:
	bash deploy/local/services.sh

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(VENV)/.installed-dev services lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_PARALLEL) tests

# The inner loop: everything but the tests marked slow (fault injection, whole-pipeline runs).
test-fast: $(VENV)/.installed-dev services
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_PARALLEL) -m "not slow" tests

# Mutation testing of the modules where a silent error corrupts results (not part of `make test`).
mutation: $(VENV)/.installed-dev services
	$(BIN)/python tools/mutation.py

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/engine.py --quick

clean:
	rm -rf camaudit-demo test-artifacts
