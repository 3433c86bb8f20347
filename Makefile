# The README's two commands:
#   make repro   set up .venv (only when pyproject/constraints changed) and run `dvc repro`
#   make test    set up the same way and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rnnlm-installed
# dvc.yaml's commands say `python -m rnnlm...`: the venv's python must come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test test-fast e2e lint format clean-venv mlflow-ui mlflow-server

install: $(STAMP)

# Re-runs only when the dependency spec changes, so a second `make` is instant.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rnnlm needs Python >= 3.11, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

repro: install
	$(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m 'not e2e'

e2e: install
	$(BIN)/python -m pytest -m e2e

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns/artifacts

# A local tracking server (SQLite backend, proxied artifacts); then, in another shell:
#   MLFLOW_TRACKING_URI=http://127.0.0.1:5000 make repro
# Another port: make mlflow-server MLFLOW_PORT=5001
MLFLOW_PORT ?= 5000
mlflow-server: install
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlruns/server.db \
		--artifacts-destination ./mlruns/server-artifacts --serve-artifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT)

clean-venv:
	rm -rf $(VENV)
