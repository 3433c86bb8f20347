# The README's two commands:
#   make repro   set up .venv (only when pyproject/constraints changed) and run `dvc repro`
#   make test    set up the same way and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rnnlm-installed
# dvc.yaml's commands say `python -m rnnlm...`: the venv's python must come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test test-fast e2e lint format clean-venv mlflow-ui mlflow-server exps serve

install: $(STAMP)

# Re-runs only when the dependency spec changes, so a second `make` is instant.
# pip prints a line per package it collects, downloads or installs, so a first install (several
# minutes: torch alone is ~200 MB) shows where it is; later runs skip this recipe entirely.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rnnlm needs Python >= 3.11, found " + sys.version.split()[0])'
	@echo "==> [1/3] virtual environment $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> [2/3] pip"
	$(BIN)/python -m pip install --progress-bar on --upgrade pip
	@echo "==> [3/3] rnnlm and its dependencies, pinned by constraints.txt (first time: minutes)"
	$(BIN)/python -m pip install --progress-bar on -c constraints.txt -e '.[dev,spark]'
	@touch $@
	@echo "==> installed; next time this step is skipped until pyproject.toml or constraints.txt change"

repro: install
	$(BIN)/dvc repro

# One pytest worker per core plus one (pytest-xdist): most tests wait on subprocesses (stages,
# servers, DVC) that leave a core idle part of the time; on 2 cores a third worker took the
# suite from 480 s to 412 s. A test file goes to one worker whole (--dist loadfile), so its
# module-scoped fixtures (a trained model, a DDP run) are built once. The 15 slowest tests are
# listed at the end, so a slow newcomer is seen.
PYTEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(len(os.sched_getaffinity(0)) + 1 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) + 1)')
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=15

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m 'not e2e'

e2e: install
	$(PYTEST) -m e2e

# What CI and the pre-commit hook run: style, formatting, and the types of src/ (pyproject's
# [tool.mypy]).
lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

# The UI on the project's store; another port: make mlflow-ui MLFLOW_PORT=5001
MLFLOW_PORT ?= 5000
mlflow-ui: install
	@echo "==> the runs: http://127.0.0.1:$(MLFLOW_PORT)/#/experiments?workflowType=machine_learning"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db \
		--default-artifact-root ./mlruns/artifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

# A local tracking server (SQLite backend, proxied artifacts); then, in another shell:
#   MLFLOW_TRACKING_URI=http://127.0.0.1:5000 make repro
# Another port: make mlflow-server MLFLOW_PORT=5001
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no job runner (seven worker processes for GenAI
# scorers and trace roll-ups, which training runs never use).
mlflow-server: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///mlruns/server.db \
		--artifacts-destination ./mlruns/server-artifacts --serve-artifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT)

# The registered model behind MLflow's scoring server on 127.0.0.1 (README: Serving): the latest
# version of export.registered_model_name from the pipeline's tracking store (MLFLOW_TRACKING_URI,
# else mlruns/), in this venv (--env-manager local). Another version or port:
#   make serve SERVE_MODEL=models:/rnnlm@champion SERVE_PORT=5051
SERVE_PORT ?= 5050
SERVE_MODEL ?=
serve: install
	@set -e; \
	params='from rnnlm import tracking; from rnnlm.config import load_params; p = load_params()'; \
	uri=$$($(BIN)/python -c "$$params; print(tracking.resolve_tracking_uri(p.mlflow))"); \
	model='$(SERVE_MODEL)'; \
	if [ -z "$$model" ]; then \
		model=models:/$$($(BIN)/python -c "$$params; print(p.export.registered_model_name)")/latest; \
	fi; \
	echo "==> $$model from $$uri on http://127.0.0.1:$(SERVE_PORT)/invocations"; \
	MLFLOW_TRACKING_URI="$$uri" exec $(BIN)/mlflow models serve -m "$$model" --env-manager local \
		--host 127.0.0.1 --port $(SERVE_PORT)

# Experiments side by side in a terminal: the params that differ and the headline metrics.
# `dvc exp show` alone lists every param, metric and dependency hash (over 140 columns).
EXPS_KEEP := ^(val_ppl|headline/test_ppl|headline/scored_test_ppl|headline/kn_test_ppl|epochs|train_time_s)$$
EXPS_DROP := ^(data|models|src|metrics)/|^(train|validation|test)\.(documents|sentences|tokens|oov_rate)$$|^vocab_size$$|^(parity|onnx|int8)/|^(best_epoch|devices|test_loss|val_loss|tokens_per_s|test_ppl)$$|^test/(tokens|oov_rate|pytorch_ppl|onnx_pytorch_rel_diff)$$|^headline/(unigram_test_ppl|improvement_over_kn_pct|cache_test_ppl)$$|^(cache|ngram)/|^test/ngram_weight$$
exps: install
	@$(BIN)/dvc exp show --no-pager --only-changed --keep '$(EXPS_KEEP)' --drop '$(EXPS_DROP)' \
		--sort-by headline/test_ppl --sort-order asc

clean-venv:
	rm -rf $(VENV)
