# Quick start targets. TORCH pins the release whose CPU wheel our CI machines hold on disk (from
# PyPI, Linux gets its CUDA build, which runs on a CPU too); on a GPU machine install your CUDA
# build of torch first, or run `make setup TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint clean

$(BIN)/llmkit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/llmkit

demo: setup
	$(BIN)/llmkit demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check llmkit tests bench
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
