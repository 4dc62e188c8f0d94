# Two commands do all the set-up: `make test` and `make demo`. Both build .venv
# when it is missing or when pyproject.toml changed, and do nothing extra otherwise.
# `make test` is the quick set (ruff, then every test not marked slow); `make test-slow`
# runs the long end-to-end tests (trainings, shipped models, examples), as CI does after it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= $(if $(EBMM_DATA),$(EBMM_DATA),$(if $(wildcard ../shared/data),../shared/data,))

.PHONY: venv test test-slow demo lint clean

venv: $(STAMP)

# torch is pinned to the build on this machine's disk cache. learn2learn 0.2.0's sdist ships
# Cython C files that do not compile on Python 3.11, so it is built with its .pyx regenerated,
# without pip's cache, so that a wheel cached by an earlier install cannot hide a broken step.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade cython setuptools wheel
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -c "import learn2learn" 2>/dev/null || \
	  $(BIN)/pip install --quiet --no-cache-dir --no-build-isolation --use-pep517 \
	    learn2learn==0.2.0 --config-settings=--build-option=build_ext
	$(BIN)/pip install --quiet --no-build-isolation -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check ebmm_cli tests examples
	EBMM_DATA=$(DATA) $(BIN)/pytest -q -m "not slow"

test-slow: $(STAMP)
	EBMM_DATA=$(DATA) $(BIN)/pytest -q -m slow

demo: $(STAMP)
	EBMM_DATA=$(DATA) $(BIN)/python examples/demo.py --out demo

lint: $(STAMP)
	$(BIN)/ruff check ebmm_cli tests examples
	$(BIN)/ruff format --check ebmm_cli tests examples

clean:
	rm -rf $(VENV) demo .pytest_cache
