#!/bin/sh
# Start the team's MLflow tracking server: PostgreSQL backend, S3-compatible artifact store,
# the basic-auth app. Everything secret comes from the environment:
#   MLFLOW_BACKEND_STORE_URI   postgresql://user:password@host:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/mlartifacts   (+ AWS_* and AWS_ENDPOINT_URL)
#   MLFLOW_AUTH_DATABASE_URI   postgresql://user:password@host:5432/mlflow_auth
#   MLFLOW_ADMIN_PASSWORD      replaces MLflow's well-known default admin password
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the app's CSRF tokens (any long random string)
#   MLFLOW_HOST (default 127.0.0.1), MLFLOW_PORT (default 5000)
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?}" "${MLFLOW_ARTIFACTS_DESTINATION:?}" "${MLFLOW_AUTH_DATABASE_URI:?}" "${MLFLOW_ADMIN_PASSWORD:?}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?}"

# No secret goes on a command line, which every local user can read (ps, /proc/<pid>/cmdline);
# a process's environment only its owner can. `mlflow server` takes each option from the
# variable of its name (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_HOST,
# MLFLOW_PORT), the basic-auth app its first admin's password from MLFLOW_AUTH_ADMIN_PASSWORD.
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION
export MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}" MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_ADMIN_PASSWORD"

# The auth database's URI can come only from the app's ini file. Every uvicorn worker reads that
# file as it imports the app, and the supervisor replaces a worker that dies with a fresh one,
# so removing the file once the server is up would make the next replacement fail. It lives as
# long as the server, readable by this user alone, and goes when the server stops.
umask 077
config_dir="$(mktemp -d)"
trap 'rm -rf "$config_dir"' EXIT
# configparser takes % for the start of a reference: a percent-encoded password needs %%.
auth_database_uri="$(printf '%s\n' "$MLFLOW_AUTH_DATABASE_URI" | sed 's/%/%%/g')"
cat > "$config_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${auth_database_uri}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"

# Not exec: this shell stays to remove the file. A stop (docker stop, Kubernetes, Ctrl-C) it
# hands on to the server, which hands it on to its workers, then waits for the server's exit.
mlflow server --app-name basic-auth &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' TERM INT HUP
status=0
wait "$server" || status=$?
while kill -0 "$server" 2>/dev/null; do  # the stop cut `wait` short
    status=0
    wait "$server" || status=$?
done
exit "$status"
