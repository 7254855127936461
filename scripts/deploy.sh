#!/usr/bin/env bash
# Create the work pools and the `gpu` concurrency limits (global, and of the gpu pool), then register every
# deployment of deployments/prefect.yaml with the server at $PREFECT_API_URL. Run from anywhere.
#
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   scripts/deploy.sh
#   prefect worker start --pool cpu &  prefect worker start --pool gpu &
set -euo pipefail
venv_bin="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"; [ -d "$venv_bin" ] && export PATH="$venv_bin:$PATH"  # the project venv
cd "$(dirname "$0")/.."
export MPO_PROJECT_DIR="${MPO_PROJECT_DIR:-$PWD}"
export MPO_IMAGE="${MPO_IMAGE:-mpo:latest}"
: "${PREFECT_API_URL:?set PREFECT_API_URL to your server, e.g. http://127.0.0.1:4200/api}"

prefect work-pool inspect cpu >/dev/null 2>&1 || prefect work-pool create cpu --type process
prefect work-pool inspect gpu >/dev/null 2>&1 || prefect work-pool create gpu --type process
prefect gcl inspect gpu >/dev/null 2>&1 || prefect gcl create gpu --limit "${MPO_GPU_SLOTS:-1}"
# at most MPO_GPU_SLOTS flow runs of the gpu pool pending or running at once: two pipelines never overlap there
prefect work-pool set-concurrency-limit gpu "${MPO_GPU_SLOTS:-1}" >/dev/null
names=(--name "mpo-pipeline/default" --name "*/cpu" --name "*/gpu" --name "mpo-train/gpu-multi")
# container pools only where they exist (prefect-docker / prefect-kubernetes workers)
prefect work-pool inspect gpu-docker >/dev/null 2>&1 && names+=(--name "mpo-train/gpu-docker")
prefect work-pool inspect gpu-kubernetes >/dev/null 2>&1 && names+=(--name "mpo-train/gpu-kubernetes")
prefect work-pool inspect gpu-multinode >/dev/null 2>&1 && names+=(--name "mpo-train/multinode-kubernetes")
prefect --no-prompt deploy --prefect-file deployments/prefect.yaml "${names[@]}"
