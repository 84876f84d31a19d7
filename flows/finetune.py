"""One Prefect flow per adaptation method, built from the method registry (`adapters_impl.METHODS`).

Each flow is a real, named Prefect flow (`<method>_finetune`) whose `config` parameter is typed with that method's
settings, so the Prefect UI shows the method's own form. They all run one pipeline (`flows.pipeline.finetune`).
Adding a method to the registry adds its flow here; nothing in this module names a method.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow, flow

from adapters_impl import METHODS, Method
from flows.pipeline import RunResult, finetune
from flows.stages import tag_flow_run
from tasks.config import RunConfig
from tasks.tracking import run_title


def method_config_type(method: Method) -> type[RunConfig]:
    """`RunConfig` narrowed to one method: its `method` section is that method's settings (defaults included)."""
    namespace = {
        "__module__": __name__,
        "__doc__": f"A run of the '{method.name}' method.",
        "__annotations__": {"method": method.settings},
        "method": method.settings(name=method.name),
        "default_method": method.name,  # a ClassVar of RunConfig: the name an unnamed `method:` section gets
    }
    return type(method.settings.__name__.removesuffix("Settings") + "RunConfig", (RunConfig,), namespace)


def method_flow(method: Method) -> Flow[Any, RunResult]:
    """The method's flow: its typed config in, the pipeline's `RunResult` out."""
    config_type = method_config_type(method)

    def run(config: RunConfig, resume: bool = False, allow_changed: bool = False, force: bool = False) -> RunResult:
        tag_flow_run(run_tags(config))
        return finetune(config, resume, allow_changed, force)

    run.__name__ = run.__qualname__ = method.flow_name
    run.__module__ = __name__
    run.__doc__ = f"{method.summary}. Evaluate against the base, probe, merge, register and promote."
    run.__annotations__ = {
        "config": config_type,
        "resume": bool,
        "allow_changed": bool,
        "force": bool,
        "return": RunResult,
    }
    return flow(name=method.flow_name, log_prints=False, flow_run_name=_run_name)(run)


def _run_name() -> str:
    """A flow run named after what it does (method and rank, objective, base, registry name), as its MLflow run."""
    from prefect.runtime import flow_run

    return run_title(RunConfig.model_validate(dict(flow_run.parameters)["config"]))


# method name -> its flow; the flow's `config` parameter type is `FLOWS[name].fn.__annotations__["config"]`.
FLOWS: dict[str, Flow[Any, RunResult]] = {name: method_flow(method) for name, method in METHODS.items()}
# Module attributes too (`flows/finetune.py:lora_finetune`), the entrypoints deployments and workers import.
globals().update({f.fn.__name__: f for f in FLOWS.values()})


def config_type_of(method_name: str) -> type[RunConfig]:
    """The config type the method's flow takes."""
    return FLOWS[method_name].fn.__annotations__["config"]  # type: ignore[no-any-return]


def run_method_flow(
    config: RunConfig, resume: bool = False, allow_changed: bool = False, force: bool = False
) -> RunResult:
    """Run the configured method's own flow with the config narrowed to its type."""
    method_name = config.method.name
    narrowed = config_type_of(method_name).model_validate(config.model_dump())
    return FLOWS[method_name](narrowed, resume, allow_changed, force)


def run_tags(config: RunConfig) -> tuple[str, ...]:
    """The Prefect tags of a run's flow run: filterable by method, objective and registered model."""
    return ("adaptflow", f"method:{config.method.name}", f"task:{config.task}", f"model:{config.registry.name}")
