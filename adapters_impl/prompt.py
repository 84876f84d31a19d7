"""Prompt tuning: trained virtual token embeddings before the input (peft); adapter-only, not mergeable."""

from __future__ import annotations

from typing import Literal

from peft import PromptTuningConfig, PromptTuningInit, TaskType
from pydantic import Field
from torch import nn

from adapters_impl._peft import apply_prompt_learning, load_peft, save_peft
from adapters_impl.base import ApplyContext, Method, MethodSettings


class PromptSettings(MethodSettings):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(10, gt=0, description="number of virtual tokens")
    init_text: str | None = Field(
        None, description="initialise the virtual tokens from this text's embeddings (null: random)"
    )


def apply(model: nn.Module, settings: PromptSettings, context: ApplyContext) -> nn.Module:
    def config(task_type: TaskType) -> PromptTuningConfig:
        if settings.init_text:
            return PromptTuningConfig(
                num_virtual_tokens=settings.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=settings.init_text,
                tokenizer_name_or_path=context.model_path,
                task_type=task_type,
            )
        return PromptTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type=task_type)

    return apply_prompt_learning(model, config, context)


METHOD = Method(
    name="prompt",
    summary="Prompt tuning: trained virtual tokens before the input, random or text-initialised; adapter-only",
    settings=PromptSettings,
    apply=apply,
    save=save_peft,
    load=load_peft,
    merge=None,
    virtual_tokens=True,
)
