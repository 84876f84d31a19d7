"""The method registry is the one source of truth: flows, config types, the grid's methods, `adaptflow methods`
and the deployments all follow it, and adding a method is one module + one registry line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from adapters_impl import METHODS
from adapters_impl.lora import LowRankSettings
from flows.finetune import FLOWS, config_type_of
from flows.serve import read_deployments
from tasks.config import GRID_METHODS
from tasks.objectives import tasks_of

# A throwaway method, registered the way a contributor would (a module's METHOD + one registry line), in a fresh
# interpreter so that every registry-derived type is built with it.
THROWAWAY = """
import json
from typing import Literal
import adapters_impl
from adapters_impl import lora
from adapters_impl.base import Method

class ToySettings(lora.LowRankSettings):
    name: Literal["toy"] = "toy"

adapters_impl.METHODS["toy"] = Method(
    name="toy", summary="a toy low-rank method", settings=ToySettings, apply=lora.apply,
    save=lora.METHOD.save, load=lora.METHOD.load, merge=lora.METHOD.merge,
)

from flows import finetune
from flows.cli import main
from tasks.config import GRID_METHODS, RunConfig

config = RunConfig.model_validate({"data": {"train": "x.jsonl"}, "method": {"name": "toy", "r": 2}})
narrowed = finetune.config_type_of("toy").model_validate({"data": {"train": "x.jsonl"}, "method": {"r": 3}})
print(json.dumps({
    "flow": finetune.FLOWS["toy"].name,
    "entrypoint": finetune.toy_finetune.name,
    "config_method": config.method.name,
    "narrowed": [narrowed.method.name, narrowed.method.r],
    "grid": list(GRID_METHODS),
}))
main(["methods", "--json"])
"""


def test_every_method_has_its_own_typed_flow() -> None:
    assert set(FLOWS) == set(METHODS)
    for name, method in METHODS.items():
        assert FLOWS[name].name == method.flow_name == f"{name}_finetune"
        config_type = config_type_of(name)
        assert config_type.model_fields["method"].annotation is method.settings
        # An unnamed method section defaults to the flow's method.
        raw = {"data": {"train": "x.jsonl"}, "task": tasks_of(method)[0], "method": {}}
        assert config_type.model_validate(raw).method.name == name


def test_grid_methods_are_the_low_rank_ones() -> None:
    assert set(GRID_METHODS) == {n for n, m in METHODS.items() if issubclass(m.settings, LowRankSettings)}
    assert {"lora", "dora", "qlora"} <= set(GRID_METHODS) and "ia3" not in GRID_METHODS


def test_deployments_list_exactly_the_registry_flows() -> None:
    method_entries = {d["entrypoint"] for d in read_deployments() if d["entrypoint"].startswith("flows/finetune.py:")}
    assert method_entries == {f"flows/finetune.py:{m.flow_name}" for m in METHODS.values()}


def test_a_new_method_is_one_module_and_one_registry_line() -> None:
    done = subprocess.run(
        [sys.executable, "-c", THROWAWAY],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, listing = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert first == {
        "flow": "toy_finetune",
        "entrypoint": "toy_finetune",
        "config_method": "toy",
        "narrowed": ["toy", 3],
        "grid": ["lora", "dora", "qlora", "toy"],
    }
    toy = next(m for m in listing["methods"] if m["name"] == "toy")
    assert (
        toy["flow"] == "toy_finetune"
        and {"key": "method.r", "default": 8, "help": "rank of the update matrices"} in (toy["settings"])
    )
