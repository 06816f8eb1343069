#!/usr/bin/env bash
# Run the issue-3 solver suites one after another (single-threaded torch: on a shared 2-core CPU
# this is several times faster than 2 threads) and record each suite's wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p results/solver-suites
for suite in solvers solvers-digits solvers-digits-schedules; do
  start=$(date +%s)
  .venv/bin/bench run "$suite" --run-id "$RUN_ID" || true
  echo "$suite $RUN_ID $(( $(date +%s) - start ))" >> results/solver-suites/times.txt
done
