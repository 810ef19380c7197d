# Two commands do all set-up on a fresh machine with Python 3.11 and pip:
#   make run   - create .venv if missing, then run the pipeline (dvc repro)
#   make test  - create .venv if missing, then run the test suite
# torch is pinned first so pip never pulls the multi-GB CUDA build on a CPU machine;
# on a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC=torch) to get a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/var/dvc

.PHONY: run test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_sandbox.py

clean:
	rm -rf var .pytest_cache
