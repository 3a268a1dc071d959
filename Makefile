# corpusforge: `make run` runs the reference pipeline end to end, `make test` runs the test suite.
# Both create .venv on first use (CPU torch 2.13.0 pinned; nothing is downloaded at run time).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SPEC   ?= pipelines/scifact.yaml
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run demo test test-all bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[serve,dev]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install corpusforge with its extras

run: install  ## the main job: raw SciFact to a published, verified snapshot
	$(BIN)/corpusforge run $(SPEC)

demo: install  ## the tiny demo pipeline (seconds)
	$(BIN)/corpusforge run pipelines/demo.yaml

test: install  ## the default test suite (no GPU, no slow tests)
	$(BIN)/python -m pytest -q

test-all: install  ## every test, slow ones included (GPU ones need a CUDA device)
	$(BIN)/python -m pytest -q -m "not gpu"

bench: install  ## the benchmarks (long)
	$(BIN)/python bench/data_stages.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/index.py

clean:  ## remove the default workspace (datasets, caches, MLflow store, snapshots)
	rm -rf workspace
