# Environment of the embedded (single machine) runtime; sourced by the Makefile targets.
# Everything lives inside the clone: Airflow's home, the data root, the MLflow store.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VENV="${VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT=120
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://127.0.0.1:8080/execution/}"
export ADFRAUD_HOME="${ADFRAUD_HOME:-$ROOT/var}"
export ADFRAUD_RUNTIME="${ADFRAUD_RUNTIME:-local}"
# A stage run by hand writes its JSON result here, not to the pod path /airflow/xcom.
export ADFRAUD_XCOM_PATH="${ADFRAUD_XCOM_PATH:-$ADFRAUD_HOME/last_result.json}"
export PYTHONPATH="$ROOT/plugins${PYTHONPATH:+:$PYTHONPATH}"
export SPARK_LOCAL_IP=127.0.0.1
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
