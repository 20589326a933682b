#!/usr/bin/env bash
# Runs the retraining DAG once, end to end, with `airflow dags test` (no scheduler
# needed), then prints the run's summary. Usage: scripts/run_dag.sh '<conf json>'
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
conf="${1:-{\}}"
# `airflow dags test` cannot answer the review prompt: approve a challenger that passes
# its gate unless the conf says otherwise.
conf=$(python -c 'import json,sys; c=json.loads(sys.argv[1]); c.setdefault("auto_approve", True); print(json.dumps(c))' "$conf")
log_dir="$ADFRAUD_HOME/logs"
mkdir -p "$log_dir" "$AIRFLOW_HOME"
log="$log_dir/dag-$(date -u +%Y%m%dT%H%M%SZ).log"

airflow db migrate > "$log_dir/migrate.log" 2>&1 || { tail -20 "$log_dir/migrate.log"; exit 1; }
echo "running adfraud_retrain with conf $conf (log: $log)"
start=$(date +%s)
if ! airflow dags test adfraud_retrain -c "$conf" > "$log" 2>&1; then
  echo "the DAG run failed; last lines of $log:" >&2
  grep -E "ERROR|error:|Traceback|failed" "$log" | tail -20 >&2
  exit 1
fi
if grep -q "state=failed" "$log"; then
  echo "a task failed; see $log" >&2
  grep -E "error:|ERROR" "$log" | tail -20 >&2
  exit 1
fi
echo "DAG run finished in $(( $(date +%s) - start )) s"
python -m jobs.summary --latest "$ADFRAUD_HOME/runs"
