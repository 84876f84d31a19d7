#!/usr/bin/env bash
# Start an MLflow tracking server on loopback over the embedded store, then:
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:${PORT}
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PORT="${1:-5000}"
mkdir -p "$here/artifacts"
exec "${MLFLOW_BIN:-mlflow}" server \
  --host 127.0.0.1 --port "$PORT" \
  --backend-store-uri "sqlite:///$here/mlflow.db" \
  --artifacts-destination "$here/artifacts"
