#!/usr/bin/env bash
# Every benchmark, one after the other (they share 2 cores: never run them side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
for bench in rollout decoder rewards learner trainer reliability scale lora; do
  echo "== bench_$bench"
  .venv/bin/python "bench/bench_$bench.py"
done
