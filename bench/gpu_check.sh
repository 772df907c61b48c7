#!/usr/bin/env bash
# The GPU check in one call (README, "Checking a GPU machine"): install, build, test, benchmark.
#   bash bench/gpu_check.sh [options of bench/gpu_check.py, e.g. --phases render,train --dry-run]
# Runs with the machine's own python3 (the one that holds torch), or $PYTHON; writes to $OUT, else gpu_check_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
