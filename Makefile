# HESCAPE platform. The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install only when the pins or the package metadata change.
STAMP  := $(VENV)/.installed-$(shell cat requirements/constraints.txt pyproject.toml 2>/dev/null | sha256sum | cut -c1-12)

export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help setup run test test-fast lint data data-s3-remote mlflow-ui clean pipeline pipeline-down

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv with the pinned stack (idempotent)

$(STAMP): requirements/constraints.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24" wheel
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[test]'
	$(BIN)/pip check
	@rm -f $(VENV)/.installed-*
	@touch $@

run: setup  ## the main job: the benchmark pipeline (curate with DVC, train, evaluate, report, register) via kfp.local
	$(BIN)/python -m hescape.main_job

test: setup  ## the whole test suite (CI runs this)
	$(BIN)/python -m pytest -q

test-fast: setup  ## tests without the slow (multi-process / training) ones
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup  ## ruff
	$(BIN)/ruff check src tests benchmarks components pipelines

data: setup  ## dvc repro + dvc push (default remote: the local directory .dvcstore)
	PATH=$(CURDIR)/$(BIN):$$PATH dvc repro
	PATH=$(CURDIR)/$(BIN):$$PATH dvc push $(if $(DVC_REMOTE),-r $(DVC_REMOTE))

data-s3-remote: setup  ## point DVC's s3 remote at $$HESCAPE_S3_BUCKET / $$HESCAPE_S3_ENDPOINT (credentials stay in the env)
	$(BIN)/hescape data s3-remote --default

mlflow-ui: setup  ## browse runs: MLflow UI on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000

pipeline: setup  ## kind cluster + KubeRay + KFP + platform, build/load images, submit the pipeline, print URLs
	scripts/pipeline_up.sh

pipeline-down:  ## stop the port-forwards and delete the kind cluster
	scripts/pipeline_down.sh

clean:  ## remove caches and local run outputs (keeps .venv and data)
	rm -rf .pytest_cache .ruff_cache .scratch runs
