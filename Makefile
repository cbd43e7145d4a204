# Two entry points: `make demo` (an audit on embedded defaults) and `make test` (lint + the whole suite).
# Both build the virtual environment themselves; `make test` also starts Redis and PostgreSQL if needed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint services bench venv clean

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
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/engine.py --quick

clean:
	rm -rf camaudit-demo test-artifacts
