#!/usr/bin/env bash
# Submit a GRPO run to a Ray cluster as a Ray job (see deploy/README.md).
#
#   deploy/ray_job.sh deploy/configs/<name>.yaml            # waits and streams the logs
#   RAY_ADDRESS=http://head:8265 deploy/ray_job.sh CONFIG --no-wait
#
# Run from the repository root: the working directory is uploaded as the job's code. Ray caps it
# at 100 MiB (zipped), so the virtualenv, outputs and caches are excluded; the cluster's nodes
# bring their own environment (the same .venv, or the image in deploy/cluster.yaml).
# Ray 2.60 turns token auth on for new clusters: the client sends the token from
# ~/.ray/auth_token (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) when RAY_AUTH_MODE=token.
# `ray job stop` sends the driver SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's
# default: 3 s). The driver needs longer to checkpoint and mark the run stopped, so the job's
# environment (which Ray's job supervisor reads it from) raises it to 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: deploy/ray_job.sh deploy/configs/<name>.yaml [ray job submit flags, e.g. --no-wait]}
shift
[[ -f "$CONFIG" ]] || { echo "ray_job: config $CONFIG not found" >&2; exit 2; }
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}

RUNTIME_ENV=$(cat <<'JSON'
{
  "excludes": [".venv", ".git", "runs", "test-artifacts", "bench/results", "*.egg-info",
               "__pycache__", ".pytest_cache", "*.safetensors", "*.onnx", "*.pt", "*.bin"],
  "env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_JOB_STOP_WAIT_TIME_S": "600"}
}
JSON
)

exec ray job submit --address "$ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV" "$@" \
  -- python -m rl.train --config "$CONFIG"
