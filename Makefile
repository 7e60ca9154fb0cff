# Everyday targets. `make run` and `make test` set everything up from a bare Python 3.11.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint format bench clean quick

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check ptum flows tests benchmarks
	$(BIN)/ruff format --check ptum flows tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format ptum flows tests benchmarks
	$(BIN)/ruff check --fix ptum flows tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/preprocess.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The whole pipeline on the tiny preset (minutes), as a DVC experiment: params.yaml untouched.
quick: $(STAMP)
	eval "$(BIN)/dvc exp run $$($(BIN)/python -m ptum.presets)"
