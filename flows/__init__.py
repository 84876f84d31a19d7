"""The Prefect flows (one per method), and the `adaptflow` CLI."""

import os

# Offline, Prefect's server would log a telemetry error on every start.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
