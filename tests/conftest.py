"""Test isolation: every test gets its own MLflow store; Prefect and the builtin model live in a session temp dir."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

# `make test` runs one xdist worker per core: one torch thread each, in the worker and in the CLIs it starts.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
_SESSION = Path(tempfile.mkdtemp(prefix="adaptflow-tests-"))
# Set before Prefect is imported anywhere: a private temporary server and result store, no telemetry.
os.environ["PREFECT_HOME"] = str(_SESSION / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ["ADAPTFLOW_CACHE"] = str(_SESSION / "cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Prefect logs its temporary server stopping at exit, after pytest has closed the captured streams.
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
# A loaded 2-core machine can need more than Prefect's default 20 s to start the temporary server.
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"

SAMPLES = Path(__file__).resolve().parent.parent / "tasks" / "builtin"


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh SQLite MLflow store (with its artifacts) per test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ADAPTFLOW_MLFLOW_DIR", str(tmp_path / "mlflow"))
    monkeypatch.chdir(tmp_path)
    # The CLI sets MLflow's process-wide URIs; point them at this test's store so no test sees another's.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The builtin tiny Llama (built offline once per session) as a local model folder."""
    from tasks.modeling import builtin_model_path

    return str(builtin_model_path("tiny"))


def _sample(tmp_path: Path, name: str, rows: int) -> Path:
    """The first `rows` lines of a bundled sample file, copied into the test's folder."""
    lines = (SAMPLES / f"sample_{name}.jsonl").read_text().splitlines()[:rows]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def stories_file(tmp_path: Path) -> Path:
    """60 sample stories as JSONL."""
    return _sample(tmp_path, "stories", 60)


@pytest.fixture
def reviews_file(tmp_path: Path) -> Path:
    """80 labelled sample reviews (string labels) as JSONL."""
    return _sample(tmp_path, "reviews", 80)


def write_config(path: Path, **sections: object) -> Path:
    """A YAML config file from sections (JSON is valid YAML)."""
    path.write_text(json.dumps(sections))
    return path
