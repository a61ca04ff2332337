#!/usr/bin/env bash
# Reflectune on one machine with process work pools: one orchestration worker (pool
# "reflectune") and one GPU worker per visible GPU (pool "gpu"), or one CPU worker where there
# is no GPU. Run from a checkout where `make setup` was done, with PREFECT_API_URL pointing at
# a Prefect server (`prefect server start`).
#
#   infra/workers/start-local.sh            # setup, deploy, start workers; Ctrl-C stops them
set -euo pipefail
cd "$(dirname "$0")/../.."
export REFLECTUNE_CODE_DIR="$PWD"
export PATH="$PWD/.venv/bin:$PATH"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"

reflectune cluster setup --pool reflectune=process --pool gpu=process
prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
prefect worker start --pool reflectune --type process --name "$(hostname)-orchestrator" --limit 4 &
pids+=($!)
infra/workers/start-gpu-workers.sh &
pids+=($!)
wait
