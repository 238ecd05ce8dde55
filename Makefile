# dgaug: `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install demo test test-slow lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q --disable-pip-version-check uv
	$(PYTHON) -m uv venv -q --allow-existing -p $(PYTHON) $(VENV)
	$(PYTHON) -m uv pip install -q -p $(BIN)/python -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## install dgaug and its dev tools into .venv with uv

demo: $(STAMP)  ## run the embedded demo (offline, CPU, tiny models) into ./demo-output
	$(BIN)/dgaug run manifests/demo.yaml

test: $(STAMP)  ## run the test suite (no network, no GPU)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)  ## the suite plus the slower tests
	$(BIN)/pytest -q -m 'not gpu' $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check dgaug tests bench
	$(BIN)/ruff format --check dgaug tests bench

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix dgaug tests bench
	$(BIN)/ruff format dgaug tests bench

bench: $(STAMP)  ## run the CPU benchmarks (tables printed, JSON in bench/results/)
	$(BIN)/python bench/download.py

clean:  ## remove the demo output and caches (keeps .venv)
	rm -rf demo-output bench/results .pytest_cache .ruff_cache
