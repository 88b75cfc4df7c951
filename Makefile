# Two commands for a fresh machine with Python 3.11+:
#   make run    set up .venv and run the pipeline (`mlflow run .`, entry point main)
#   make test   set up .venv and run the test suite
# A tracking server for a team (PostgreSQL on 127.0.0.1, needs Debian's postgresql package):
#   make server / make server-auth / make server-stop    (deploy/tracking-server.sh)
# `make run SOURCE=path/to/archive.zip` takes another source than the public archive.

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
SOURCE ?=
RUN_ARGS ?=
# Test processes (pytest-xdist, one test file per process): the suite is mostly process start-up,
# imports and waits on subprocesses, which two processes overlap even on two cores.
TEST_WORKERS ?= 2

# `mlflow run --env-manager local` starts each entry point with the `python` on PATH.
export PATH := $(BIN):$(PATH)
export MLFLOW_EXPERIMENT_NAME ?= sign-language-digits

.PHONY: setup run test lint clean server server-auth server-stop

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# TensorFlow's wheel is 570 MB: a download cut short resumes, and a failed install is tried again.
	for attempt in 1 2 3; do \
	  $(BIN)/python -m pip install --quiet --resume-retries 20 -e ".[dev]" && break; \
	  [ $$attempt -lt 3 ] || exit 1; \
	  echo "pip install failed (attempt $$attempt of 3); trying again in 30 s" >&2; sleep 30; \
	done
	touch $@

run: setup
	$(BIN)/mlflow run . --env-manager local $(if $(SOURCE),-P source=$(abspath $(SOURCE))) $(RUN_ARGS)

test: setup
	$(BIN)/python -m pytest --numprocesses $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

server: setup
	PYTHON=$(BIN)/python deploy/tracking-server.sh start

server-auth: setup
	PYTHON=$(BIN)/python deploy/tracking-server.sh start --auth

server-stop:
	deploy/tracking-server.sh stop

lint: setup
	$(BIN)/ruff check pipeline tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
