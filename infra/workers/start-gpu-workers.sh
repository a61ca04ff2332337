#!/usr/bin/env bash
# One Prefect worker per GPU on the "gpu" pool, each seeing only its own GPU
# (CUDA_VISIBLE_DEVICES) and running one flow run at a time (--limit 1): a GPU batch or step flow
# loads its engine once and owns the device until it ends. Without GPUs, one CPU worker.
#
#   GPU_POOL=gpu WORKER_TYPE=process infra/workers/start-gpu-workers.sh
set -euo pipefail
POOL="${GPU_POOL:-gpu}"
TYPE="${WORKER_TYPE:-process}"
# flow runs send heartbeats; `reflectune cluster setup` crashes runs whose heartbeats stop
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"
export REFLECTUNE_CODE_DIR="${REFLECTUNE_CODE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}"

if command -v nvidia-smi >/dev/null 2>&1; then
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader)
else
  gpus=()
fi

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
if [ "${#gpus[@]}" -eq 0 ]; then
  echo "no GPU found: one CPU worker on pool $POOL" >&2
  prefect worker start --pool "$POOL" --type "$TYPE" --name "$(hostname)-cpu" --limit 1 &
  pids+=($!)
else
  for gpu in "${gpus[@]}"; do
    CUDA_VISIBLE_DEVICES="$gpu" prefect worker start --pool "$POOL" --type "$TYPE" \
      --name "$(hostname)-gpu$gpu" --limit 1 &
    pids+=($!)
  done
fi
wait
