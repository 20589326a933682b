#!/usr/bin/env bash
# The test suite: fast tests first, then the slow ones (Spark, Ray, torchrun, the DAG).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
python -m pytest -m "not slow" -q --durations=10 "$@"
python -m pytest -m "slow" -q --durations=20 "$@"
