# dgaug: `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install demo report-screenshot test test-fast test-slow soak lint format bench scaling gpu-wheels clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q --disable-pip-version-check uv
	$(PYTHON) -m uv venv -q --allow-existing -p $(PYTHON) $(VENV)
	@# --compile-bytecode: with PYTHONDONTWRITEBYTECODE set (as on these machines), each process would
	@# compile everything it imports: torch, diffusers, open_clip and ray took 15.8 s, not 6.2.
	$(PYTHON) -m uv pip install -q --compile-bytecode -p $(BIN)/python -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## install dgaug and its dev tools into .venv with uv

demo: $(STAMP)  ## run the embedded demo (offline, CPU, the toy models) into ./demo-output, train and evaluate, then write its report
	$(BIN)/dgaug run manifests/demo.yaml
	$(BIN)/dgaug train manifests/demo.yaml
	$(BIN)/dgaug report manifests/demo.yaml

toy-data: $(STAMP)  ## the toy world's training shards: 12,000 procedural images written by dgaug into ./toy-data
	$(BIN)/dgaug run toy/data.yaml

# The two trainings run side by side, one thread each (about 40 min on 2 cores, toy/README.md).
toy-models: toy-data  ## remake the shipped toy CLIP and LDM in dgaug/models/toy/ from ./toy-data (CPU; toy/README.md)
	$(BIN)/python toy/train_clip.py & clip=$$!; \
	$(BIN)/python toy/train_ldm.py; ldm=$$?; \
	wait $$clip; clip=$$?; test $$ldm -eq 0 && test $$clip -eq 0

report-screenshot: $(STAMP)  ## re-take docs/report.png, the README's picture of the demo report (needs chromium)
	$(BIN)/dgaug report manifests/demo.yaml
	chromium --headless --no-sandbox --hide-scrollbars --user-data-dir=$$(mktemp -d) \
	  --screenshot=docs/report.png --window-size=1280,1600 file://$(CURDIR)/demo-output/report/index.html

# A later -m replaces pyproject's `-m 'not gpu'`, so each tier says `not gpu` again.
test: $(STAMP)  ## run the whole test suite but the GPU tests (no network, no GPU)
	$(BIN)/pytest -q -m 'not gpu' $(PYTEST_ARGS)

test-fast: $(STAMP)  ## the suite without the slow tests (end-to-end, kills, cluster, S3 server): a few minutes
	$(BIN)/pytest -q -m 'not gpu and not slow' $(PYTEST_ARGS)

test-slow: $(STAMP)  ## only the slow tests: end-to-end, kills, cluster, S3 server
	$(BIN)/pytest -q -m 'slow and not gpu' $(PYTEST_ARGS)

soak: $(STAMP)  ## the kill harness with many SIGKILLs over every stage (a table; JSON in bench/results/)
	$(BIN)/python tests/soak.py --kills 50 --seed 0

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check dgaug tests bench
	$(BIN)/ruff format --check dgaug tests bench

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix dgaug tests bench
	$(BIN)/ruff format dgaug tests bench

bench: $(STAMP)  ## run the CPU benchmarks (tables printed, JSON in bench/results/)
	$(BIN)/python bench/download.py
	$(BIN)/python bench/edsam.py

scaling: $(STAMP)  ## the demo graph on Ray with 1, 2 and 4 workers per stage, and the GPU-hours estimate
	$(BIN)/python bench/scaling.py

# The lent GPU machine has Python 3.12 with torch and transformers but not these: bench/edsam_gpu.sh
# installs them from .whl/ (git-ignored), which travels with the call (carry: [.whl]).
GPU_WHEELS := diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
	webdataset==0.2.86 braceexpand==0.1.7
gpu-wheels:  ## download the wheels bench/edsam_gpu.sh needs on the GPU machine into .whl/
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)

clean:  ## remove the demo output and caches (keeps .venv)
	rm -rf demo-output bench/results .pytest_cache .ruff_cache
