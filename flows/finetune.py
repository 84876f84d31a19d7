"""One Prefect flow per adaptation method, typed with that method's settings (a form in the Prefect UI).

They share one pipeline (`flows.pipeline.finetune`); each flow only fixes which method's settings it accepts.
"""

from __future__ import annotations

from typing import Any, ClassVar

from prefect import Flow, flow

from adapters_impl.adapter import AdapterSettings
from adapters_impl.dora import DoraSettings
from adapters_impl.full import FullSettings
from adapters_impl.head import HeadSettings
from adapters_impl.ia3 import IA3Settings
from adapters_impl.lora import LoraSettings
from adapters_impl.prefix import PrefixSettings
from adapters_impl.prompt import PromptSettings
from adapters_impl.qlora import QLoraSettings
from flows.pipeline import RunResult, finetune
from tasks.config import RunConfig


class FullRunConfig(RunConfig):
    default_method: ClassVar[str] = "full"
    method: FullSettings = FullSettings()


class HeadRunConfig(RunConfig):
    default_method: ClassVar[str] = "head"
    method: HeadSettings = HeadSettings()


class LoraRunConfig(RunConfig):
    default_method: ClassVar[str] = "lora"
    method: LoraSettings = LoraSettings()


class DoraRunConfig(RunConfig):
    default_method: ClassVar[str] = "dora"
    method: DoraSettings = DoraSettings()


class QLoraRunConfig(RunConfig):
    default_method: ClassVar[str] = "qlora"
    method: QLoraSettings = QLoraSettings()


class IA3RunConfig(RunConfig):
    default_method: ClassVar[str] = "ia3"
    method: IA3Settings = IA3Settings()


class AdapterRunConfig(RunConfig):
    default_method: ClassVar[str] = "adapter"
    method: AdapterSettings = AdapterSettings()


class PrefixRunConfig(RunConfig):
    default_method: ClassVar[str] = "prefix"
    method: PrefixSettings = PrefixSettings()


class PromptRunConfig(RunConfig):
    default_method: ClassVar[str] = "prompt"
    method: PromptSettings = PromptSettings()


@flow(name="full_finetune", log_prints=True)
def full_finetune(config: FullRunConfig, resume: bool = False) -> RunResult:
    """Fine-tune every weight, evaluate against the base, register and promote."""
    return finetune(config, resume)


@flow(name="head_finetune", log_prints=True)
def head_finetune(config: HeadRunConfig, resume: bool = False) -> RunResult:
    """Train a classification head on the frozen base, evaluate against the majority class, register, promote."""
    return finetune(config, resume)


@flow(name="lora_finetune", log_prints=True)
def lora_finetune(config: LoraRunConfig, resume: bool = False) -> RunResult:
    """Fine-tune with LoRA, evaluate against the base, merge, register and promote."""
    return finetune(config, resume)


@flow(name="dora_finetune", log_prints=True)
def dora_finetune(config: DoraRunConfig, resume: bool = False) -> RunResult:
    """Fine-tune with DoRA, evaluate against the base, merge, register and promote."""
    return finetune(config, resume)


@flow(name="qlora_finetune", log_prints=True)
def qlora_finetune(config: QLoraRunConfig, resume: bool = False) -> RunResult:
    """LoRA on a 4-bit base; merge into the full-precision base and report the gap; register and promote."""
    return finetune(config, resume)


@flow(name="ia3_finetune", log_prints=True)
def ia3_finetune(config: IA3RunConfig, resume: bool = False) -> RunResult:
    """Fine-tune with IA3, evaluate against the base, merge, register and promote."""
    return finetune(config, resume)


@flow(name="adapter_finetune", log_prints=True)
def adapter_finetune(config: AdapterRunConfig, resume: bool = False) -> RunResult:
    """Train bottleneck adapters, evaluate against the base, register adapter-only and promote."""
    return finetune(config, resume)


@flow(name="prefix_finetune", log_prints=True)
def prefix_finetune(config: PrefixRunConfig, resume: bool = False) -> RunResult:
    """Train prefixes, evaluate against the base, register adapter-only and promote."""
    return finetune(config, resume)


@flow(name="prompt_finetune", log_prints=True)
def prompt_finetune(config: PromptRunConfig, resume: bool = False) -> RunResult:
    """Train a soft prompt, evaluate against the base, register adapter-only and promote."""
    return finetune(config, resume)


# method name -> (its flow, the config type that flow takes)
FLOWS: dict[str, tuple[Flow[Any, RunResult], type[RunConfig]]] = {
    "full": (full_finetune, FullRunConfig),
    "head": (head_finetune, HeadRunConfig),
    "lora": (lora_finetune, LoraRunConfig),
    "dora": (dora_finetune, DoraRunConfig),
    "qlora": (qlora_finetune, QLoraRunConfig),
    "ia3": (ia3_finetune, IA3RunConfig),
    "adapter": (adapter_finetune, AdapterRunConfig),
    "prefix": (prefix_finetune, PrefixRunConfig),
    "prompt": (prompt_finetune, PromptRunConfig),
}


def run_method_flow(config: RunConfig, resume: bool = False) -> RunResult:
    """Run the configured method's own flow with the config narrowed to its type."""
    method_flow, config_type = FLOWS[config.method.name]
    return method_flow(config_type.model_validate(config.model_dump()), resume)
