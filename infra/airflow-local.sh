#!/usr/bin/env bash
# A local Airflow for corpusforge, listening on 127.0.0.1 only (`make airflow` runs it).
#
#   infra/airflow-local.sh                 migrate the database, serialize the DAGs, then run the
#                                          api-server (UI and REST API on http://127.0.0.1:8080), the
#                                          scheduler, the dag-processor and the triggerer until Ctrl-C
#   infra/airflow-local.sh prepare         only migrate and serialize
#   infra/airflow-local.sh COMMAND ...     any other airflow command in the same environment
#                                          (e.g. `dags list`, `dags trigger corpusforge_demo`)
#
# Not `airflow standalone`: its components start each other as `airflow` found on PATH (so
# .venv-airflow/bin goes first on PATH here anyway), and its scheduler and triggerer serve their
# logs on every network interface; here they run with --skip-serve-logs (the api-server reads the
# task logs from $AIRFLOW_HOME/logs on this machine). Log in as `admin` with the password in
# $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated (printed when first generated).
# Settings (environment): AIRFLOW_HOME (default .airflow/: sqlite database, logs, password),
# AIRFLOW_PORT (default 8080); the CORPUSFORGE_* variables of docs/orchestration.md reach the tasks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AIRFLOW_VENV:-$ROOT/.venv-airflow}"
PORT="${AIRFLOW_PORT:-8080}"
if [ ! -x "$VENV/bin/airflow" ]; then
    echo "airflow-local: $VENV/bin/airflow is missing; create it with 'make airflow-venv'" >&2
    exit 2
fi

export PATH="$VENV/bin:$PATH"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$ROOT/dags}"
export AIRFLOW__CORE__LOAD_EXAMPLES="${AIRFLOW__CORE__LOAD_EXAMPLES:-False}"
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT="$PORT"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$PORT"
# Task processes report to the api-server's execution API: the same address.
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$PORT/execution/"
# Task processes call the api-server; on a busy laptop its answers can take longer than the default 5 s.
export AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="${AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT:-60}"
# The LocalExecutor starts one worker process per slot up front; a few suit a laptop's DAG runs.
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$AIRFLOW_HOME"

prepare() {
    airflow db migrate
    airflow dags reserialize   # `dags list` and the UI read serialized DAGs
}

up() {
    prepare
    # Stop every component when this script stops (Ctrl-C, TERM) or when one of them exits.
    trap 'trap - EXIT; kill -TERM $(jobs -p) 2>/dev/null; wait' INT TERM EXIT
    airflow api-server &
    airflow scheduler --skip-serve-logs &
    airflow dag-processor &
    airflow triggerer --skip-serve-logs &
    echo "airflow-local: http://127.0.0.1:$PORT (user admin, password in" \
         "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated); Ctrl-C stops it" >&2
    wait -n
}

case "${1:-up}" in
    up) up ;;
    prepare) prepare ;;
    *) exec airflow "$@" ;;
esac
