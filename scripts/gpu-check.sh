#!/usr/bin/env bash
# The GPU check, one command for a borrowed GPU machine (no registry, no weights; Python 3.12 with torch,
# transformers, accelerate, peft, pyarrow, pandas preinstalled; the rest travels in .gpu-check-deps/, which
# `make gpu-check-deps` prepares). Runs the tests marked `gpu` and benchmarks/train_step.py on a random-weight
# ~1B Llama (bf16): ours vs the paper's online step vs TRL's DPO. Last line:
#   gpu_step_ratio=<x> gpu_peak_mem_ratio=<y> gpu_mfu=<z>
# `scripts/gpu-check.sh --cpu-smoke` runs the same code on the CPU with a tiny model (CI runs it), so the
# script cannot rot between GPU loans. About 5 minutes on an H200; under 2 minutes for the smoke.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--cpu-smoke" ]]; then
    export MPO_GPU_TESTS_ON_CPU=1
    bench=(--synthetic tiny --device cpu --pairs-per-step 2 --max-length 64 --steps 2 --warmup 1)
else
    bench=(--synthetic 1b --device cuda --pairs-per-step 4 --max-length 1024 --steps 5 --warmup 2)
fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ "$PYTHON" != .venv/bin/python && -d .gpu-check-deps/site ]]; then  # a GPU image's own Python 3.12
    export PYTHONPATH="$PWD/.gpu-check-deps/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

"$PYTHON" - <<'PY'
import torch, transformers
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch={torch.__version__} transformers={transformers.__version__} cuda_device={cuda}", flush=True)
PY
"$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_logps.py tests/test_sharded.py
"$PYTHON" benchmarks/train_step.py "${bench[@]}"
