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
config="$(mktemp -d)/basic_auth.ini"
umask 077
cat > "$config" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = admin
admin_password = ${MLFLOW_ADMIN_PASSWORD}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"
exec mlflow server --app-name basic-auth \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}"
