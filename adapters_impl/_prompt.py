"""What prompt tuning does to a model (peft); its settings and rules are in prompt.py."""

from __future__ import annotations

from peft import PromptTuningConfig, PromptTuningInit, TaskType
from torch import nn

from adapters_impl._peft import apply_prompt_learning
from adapters_impl.base import ApplyContext
from adapters_impl.prompt import PromptSettings


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
