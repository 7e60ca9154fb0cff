# Everyday targets. `make run` and `make test` set everything up from a bare Python 3.11.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Stages run `ptum ...` (dvc.yaml cmd lines): the venv's bin must be on PATH without activating it.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: paper run test test-fast lint format bench clean quick movielens synthetic-default regime prefect-server prefect-serve prefect-run prefect-deploy optuna-dashboard bench-serve

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dvc repro

# Tests run in TEST_WORKERS processes (pytest-xdist), each test module on one of them (its
# module fixtures built once), the modules with slow tests first (tests/conftest.py; xdist
# would otherwise reorder them by size); TEST_WORKERS=0 runs them in this process. The 30
# slowest tests are listed at the end (where the suite's time goes, also in CI logs).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=30

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check ptum flows tests benchmarks
	$(BIN)/ruff format --check ptum flows tests benchmarks
	$(BIN)/mypy ptum

format: $(STAMP)
	$(BIN)/ruff format ptum flows tests benchmarks
	$(BIN)/ruff check --fix ptum flows tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/preprocess.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# The whole pipeline on the tiny preset (minutes), as a DVC experiment in a temporary copy
# (--temp): params.yaml, dvc.lock and the outputs of the workspace stay as they are.
quick: $(STAMP)
	eval "$(BIN)/dvc exp run --temp $$($(BIN)/python -m ptum.presets)"

# The MovieLens-100K result set (reads ../shared/data/movielens-100k; nothing of it is committed
# but the metrics and reports): its own params.yaml, dvc.yaml and dvc.lock.
movielens: $(STAMP)
	cd experiments/movielens-100k && $(CURDIR)/$(BIN)/dvc repro

# The paper's full grid (six models, 10 repeats, the lambda and K sweeps) on the 6,000-user set.
paper: synthetic-default

# The 6,000-user synthetic result set (well over 1.5 h on 2 cores).
synthetic-default: $(STAMP)
	cd experiments/synthetic-default && $(CURDIR)/$(BIN)/dvc repro

# The paper's regime: pre-training pools of 1x, 5x, 25x the labeled users of a 56,000-user
# synthetic set (data stages + the regime stage only; docs/results.md gives its run time).
regime: $(STAMP)
	cd experiments/synthetic-regime && $(CURDIR)/$(BIN)/dvc repro

# Prefect: a local server bound to 127.0.0.1 (state under .prefect/), the deployment ptum/full
# served by a long-running process, and a run of it (an isolated DVC experiment: params.yaml
# untouched). Use three terminals, in this order.
PREFECT_ENV := PREFECT_HOME=$(CURDIR)/.prefect PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_SERVER_ANALYTICS_ENABLED=false
prefect-server: $(STAMP)
	$(PREFECT_ENV) $(BIN)/prefect server start --host 127.0.0.1 --port 4200
prefect-serve: $(STAMP)
	$(PREFECT_ENV) $(BIN)/python -m flows.serve
prefect-run: $(STAMP)
	$(PREFECT_ENV) $(BIN)/prefect deployment run ptum/full --watch $(if $(QUICK),-p quick=true)
# Deployment ptum/pool on a process work pool (POOL=name), for `prefect worker start --pool`.
prefect-deploy: $(STAMP)
	$(PREFECT_ENV) $(BIN)/python -m flows.deploy --pool $(or $(POOL),ptum)

# Optuna's dashboard on the tuning study, local only: http://127.0.0.1:8080/dashboard
# STORAGE: another study URL, e.g. postgresql+psycopg2://ptum@db-host/optuna (docs/tuning.md).
STORAGE ?= sqlite:///data/tune/optuna.db
optuna-dashboard: $(STAMP)
	$(BIN)/optuna-dashboard $(STORAGE) --host 127.0.0.1 --port 8080

bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve.py
