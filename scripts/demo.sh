#!/usr/bin/env bash
# The README's main job: a full GRPO run on tiny models on this CPU, with the live dashboard.
# A tiny Qwen3 policy on vLLM learns to "write" a word that real PaddleOCR reads (~2 min on 2 idle cores).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-deploy/configs/tiny-cpu-glyph-ocr.yaml}
RUNS=${RUNS_DIR:-$PWD/runs}  # absolute: the dashboard and the trainer read the same store
PORT=${DASHBOARD_PORT:-8266}
mkdir -p "$RUNS"
.venv/bin/blip3o-rl dashboard --runs-dir "$RUNS" --host 127.0.0.1 --port "$PORT" > "$RUNS/dashboard.log" 2>&1 &
DASHBOARD=$!
trap 'kill $DASHBOARD 2>/dev/null || true' EXIT
echo "dashboard: http://127.0.0.1:$PORT  (reward curves and sample images, live)"
.venv/bin/blip3o-rl train --config "$CONFIG" --runs-dir "$RUNS"
if [[ -t 0 ]]; then
  echo "run finished; the dashboard stays up at http://127.0.0.1:$PORT until you press Ctrl-C"
  wait $DASHBOARD
fi
