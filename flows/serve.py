"""`adaptflow serve`: every deployment of `deployments/prefect.yaml`, schedules and triggers, in one process.

prefect.yaml stays the one description of the deployments: the same file works with `prefect deploy` and
work pools (process, Docker, Kubernetes); here it is read and served by a Prefect runner, which starts each
flow run in a local subprocess, like a process work pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"


def read_deployments(prefect_file: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The deployment entries of a prefect.yaml (YAML anchors and merges resolved)."""
    from tasks.yaml_files import read_yaml

    return list(read_yaml(prefect_file)["deployments"])


def build_deployments(prefect_file: Path = PREFECT_FILE) -> list[Any]:
    """`RunnerDeployment`s with their parameters, cron schedules (with time zones) and event triggers."""
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    triggers: TypeAdapter[list[Any]] = TypeAdapter(list[DeploymentTriggerTypes])
    built = []
    for spec in read_deployments(prefect_file):
        flow: Any = load_flow_from_entrypoint(str(PROJECT_ROOT / spec["entrypoint"]))
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True)) for s in spec.get("schedules", [])
        ]
        built.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters") or {},
                schedules=schedules or None,
                triggers=list(triggers.validate_python(spec.get("triggers", []))),
            )
        )
    return built


def serve_all(prefect_file: Path = PREFECT_FILE, limit: int | None = None) -> None:
    """Serve until Ctrl-C (or SIGTERM). Flow runs write `runs/` in the working directory; presets named by a
    repository-relative path (deployments/...) are found from anywhere."""
    from prefect import serve

    deployments = build_deployments(prefect_file)
    serve(*deployments, limit=limit, print_starting_message=True)
