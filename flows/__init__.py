"""The Prefect flows (one per method), and the `adaptflow` CLI."""

import os

# Offline, Prefect's server would log a telemetry error on every start.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The temporary server migrates a fresh SQLite database on first start: 20 s (Prefect's default) is too
# little on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# MLflow's HTTP client retries a dead server for minutes by default; fail (and buffer, and retry) sooner.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
