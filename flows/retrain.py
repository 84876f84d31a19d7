"""Retraining on the newest data, for schedules and new-data triggers: a run or the grid, then promotion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.finetune import run_method_flow
from flows.grid import lora_grid
from tasks.config import GridSettings, load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@flow(name="retrain", log_prints=False)
def retrain(config: str = "deployments/retrain.yaml", data: str | None = None, grid: bool = False) -> dict[str, Any]:
    """Fine-tune the preset `config` on `data` (a file or folder; default: the preset's), then promote.

    Args:
        config: a preset config file (paths in it are read from the working directory, then beside it).
        data: the newest data; a trigger passes the folder that changed.
        grid: run the comparison grid (the preset's `grid` section) instead of a single run.
    """
    preset = Path(config)
    if not preset.exists() and (PROJECT_ROOT / preset).exists():  # deployments name presets from the repo root
        preset = PROJECT_ROOT / preset
    settings = load_config(preset)
    if data:
        settings = settings.model_copy(update={"data": settings.data.model_copy(update={"train": data})})
    print(f"retraining {settings.method.name} on {settings.data.train}")
    if grid:
        return lora_grid(settings.model_copy(update={"grid": settings.grid or GridSettings()})).model_dump()
    return run_method_flow(settings).model_dump()
