# corpusforge: `make run` runs the reference pipeline end to end, `make test` runs the test suite.
# Both create .venv on first use (CPU torch 2.13.0 pinned; nothing is downloaded at run time).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Airflow 3 pins an older FastAPI than the endpoint uses, so it lives in a venv of its own.
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_VERSION ?= 3.3.2
SPEC   ?= pipelines/scifact.yaml
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install install-gpu airflow-venv airflow run demo test test-all test-gpu bench clean

# torch comes through pip: the CPU wheel lies on this machine's disk where pip (not uv) looks. The
# rest goes through uv (installed into .venv): ~15 s per venv instead of minutes, same requirements.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==2.13.0" uv
	$(BIN)/uv pip install -q --python $(BIN)/python -e ".[serve,orchestration,dev,ray]" "torch==2.13.0"
	touch $@

$(AIRFLOW_VENV)/.installed: pyproject.toml $(VENV)/.installed
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(BIN)/uv pip install -q --python $(AIRFLOW_VENV)/bin/python "apache-airflow==$(AIRFLOW_VERSION)" -e ".[dev]" \
		"torch==2.13.0"
	touch $@

install: $(VENV)/.installed  ## create .venv and install corpusforge with its extras

airflow-venv: $(AIRFLOW_VENV)/.installed  ## the Airflow venv (corpusforge + apache-airflow)

airflow: airflow-venv  ## a local Airflow (standalone) on http://127.0.0.1:8080, DAGs from dags/, state in .airflow/
	AIRFLOW_VENV=$(CURDIR)/$(AIRFLOW_VENV) infra/airflow-local.sh

run: install  ## the main job: raw SciFact to a published, verified snapshot
	$(BIN)/corpusforge run $(SPEC)

demo: install  ## the tiny demo pipeline (seconds)
	$(BIN)/corpusforge run pipelines/demo.yaml

# Two pytest-xdist workers, one per core (`--dist loadgroup`: a module's tests stay on one worker, so its
# module fixtures are made once; tests/conftest.py). TEST_WORKERS=0 runs the suite serially.
TEST_WORKERS ?= 2
# --max-worker-restart=0: a worker that dies fails the run at once, naming its test (`worker gwN crashed while
# running ...`); replacing it under loadgroup can leave every worker idle (pytest-xdist #1378).
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --max-worker-restart=0 --durations=15

test: install airflow-venv  ## the default test suite (no GPU, no slow tests)
	$(PYTEST)

test-all: install airflow-venv  ## every test, slow ones included (GPU ones need a CUDA device)
	$(PYTEST) -m "not gpu"

test-gpu: install-gpu  ## the `gpu`-marked tests (CUDA fp16 encoding vs CPU fp32, IVF training on the GPU)
	$(PYTEST) -n 0 -m gpu

# GPU machines only. uv takes torch==2.13.0 from PyPI, whose Linux x86_64 wheel is the CUDA build (pip here would
# take the CPU file on disk). faiss-gpu-cu12 and faiss-cpu ship the same `faiss` module: faiss-cpu's copy goes.
install-gpu: install  ## CUDA torch and FAISS's GPU build into .venv (several GB; never part of `install`)
	$(BIN)/uv pip install -q --python $(BIN)/python --reinstall-package torch -e ".[serve,orchestration,dev,ray,gpu]" \
		"torch==2.13.0"
	$(BIN)/uv pip uninstall -q --python $(BIN)/python faiss-cpu
	$(BIN)/uv pip install -q --python $(BIN)/python --reinstall-package faiss-gpu-cu12 "faiss-gpu-cu12>=1.9"
	$(BIN)/python -c "import torch, faiss; print('cuda', torch.cuda.is_available(), 'faiss gpus', faiss.get_num_gpus())"

bench: install  ## the benchmarks (long)
	$(BIN)/python bench/data_stages.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/index.py

clean:  ## remove the default workspace (datasets, caches, MLflow store, snapshots)
	rm -rf workspace
