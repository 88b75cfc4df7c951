# Two commands for a fresh machine with Python 3.11+:
#   make run    set up .venv and run the pipeline (`mlflow run .`, entry point main)
#   make test   set up .venv and run the test suite
# `make run SOURCE=path/to/archive.zip` takes another source than the public archive.

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
SOURCE ?=
RUN_ARGS ?=

# `mlflow run --env-manager local` starts each entry point with the `python` on PATH.
export PATH := $(BIN):$(PATH)
export MLFLOW_EXPERIMENT_NAME ?= sign-language-digits

.PHONY: setup run test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
	$(BIN)/mlflow run . --env-manager local $(if $(SOURCE),-P source=$(abspath $(SOURCE))) $(RUN_ARGS)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check pipeline tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
