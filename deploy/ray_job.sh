#!/usr/bin/env bash
# Submit a GRPO run to a Ray cluster as a Ray job (see docs/deploying.md).
#
#   deploy/ray_job.sh deploy/configs/<name>.yaml            # waits and streams the logs
#   deploy/ray_job.sh CONFIG --resume RUN_ID                 # continue a run from its checkpoint
#   deploy/ray_job.sh CONFIG --steps 4 --no-wait             # --resume/--steps go to the trainer,
#   RAY_ADDRESS=http://head:8265 deploy/ray_job.sh CONFIG    # every other flag to `ray job submit`
#
# The repository this script is in is uploaded as the job's code. Ray runs the job in a temporary
# copy of it, so relative paths in the config (runs/, runs/models/...) are made to start at
# BLIP3O_RL_ROOT, which the job gets set to this repository (or to BLIP3O_RL_ROOT if you set one:
# on a remote cluster, the run root on its head). See docs/deploying.md, "Where a run's files go".
# Ray caps the upload at 100 MiB (zipped), so the virtualenv, outputs and caches are excluded;
# the cluster's nodes bring their own environment (the same .venv, or the image in deploy/cluster.yaml).
# Ray 2.60 turns token auth on for new clusters: the client sends the token from
# ~/.ray/auth_token (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) when RAY_AUTH_MODE=token.
# `ray job stop` sends the driver SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's
# default: 3 s). The driver needs longer to checkpoint and mark the run stopped, so the job's
# environment (which Ray's job supervisor reads it from) raises it to 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE="usage: deploy/ray_job.sh deploy/configs/<name>.yaml [--resume RUN_ID] [--steps N] [ray job submit flags]"
CONFIG=${1:?$USAGE}
shift
[[ -f "$CONFIG" ]] || { echo "ray_job: config $CONFIG not found" >&2; exit 2; }
TRAIN_ARGS=() SUBMIT_ARGS=()
while (($#)); do
  case $1 in
    --resume|--steps) [[ $# -ge 2 ]] || { echo "ray_job: $1 needs a value; $USAGE" >&2; exit 2; }
                      TRAIN_ARGS+=("$1" "$2"); shift 2 ;;
    *) SUBMIT_ARGS+=("$1"); shift ;;
  esac
done
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
ROOT=${BLIP3O_RL_ROOT:-$PWD}
ROOT_JSON=${ROOT//\\/\\\\}; ROOT_JSON=${ROOT_JSON//\"/\\\"}

RUNTIME_ENV=$(cat <<JSON
{
  "excludes": [".venv", ".git", "runs", "test-artifacts", "bench/results", "*.egg-info",
               "__pycache__", ".pytest_cache", "*.safetensors", "*.onnx", "*.pt", "*.bin"],
  "env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_JOB_STOP_WAIT_TIME_S": "600",
               "BLIP3O_RL_ROOT": "$ROOT_JSON"}
}
JSON
)

# BLIP3O_RL_LAUNCHER: the driver names this script (not `python -m rl.run.train`) in a stopped run's resume hint
exec ray job submit --address "$ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV" \
  ${SUBMIT_ARGS[@]+"${SUBMIT_ARGS[@]}"} -- env BLIP3O_RL_LAUNCHER=deploy/ray_job.sh \
  python -m rl.run.train --config "$CONFIG" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
