"""Prefix tuning: trained key/value prefixes in every attention layer (peft); adapter-only, not mergeable."""

from __future__ import annotations

from typing import Literal

from peft import PrefixTuningConfig, TaskType
from pydantic import Field
from torch import nn

from adapters_impl._peft import apply_prompt_learning, load_peft, save_peft
from adapters_impl.base import ApplyContext, Method, MethodSettings


class PrefixSettings(MethodSettings):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(10, gt=0, description="prefix length per layer")
    projection: bool = Field(False, description="reparametrize the prefix through an MLP (more stable, more weights)")
    projection_hidden_size: int = Field(128, gt=0, description="hidden size of that MLP")


def apply(model: nn.Module, settings: PrefixSettings, context: ApplyContext) -> nn.Module:
    def config(task_type: TaskType) -> PrefixTuningConfig:
        return PrefixTuningConfig(
            num_virtual_tokens=settings.num_virtual_tokens,
            prefix_projection=settings.projection,
            encoder_hidden_size=settings.projection_hidden_size,
            task_type=task_type,
        )

    return apply_prompt_learning(model, config, context)


METHOD = Method(
    name="prefix",
    summary="Prefix tuning: trained key/value prefixes in every layer; adapter-only (not mergeable)",
    settings=PrefixSettings,
    apply=apply,
    save=save_peft,
    load=load_peft,
    merge=None,
    virtual_tokens=True,
    checkpointing_problem=(
        "its virtual keys and values enter every layer as a cache, which checkpointed layers drop; set it to false "
        "or use prompt or lora"
    ),
)
