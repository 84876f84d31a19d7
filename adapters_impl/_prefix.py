"""What prefix tuning does to a model (peft); its settings and rules are in prefix.py."""

from __future__ import annotations

from peft import PrefixTuningConfig, TaskType
from torch import nn

from adapters_impl._peft import apply_prompt_learning
from adapters_impl.base import ApplyContext
from adapters_impl.prefix import PrefixSettings


def apply(model: nn.Module, settings: PrefixSettings, context: ApplyContext) -> nn.Module:
    def config(task_type: TaskType) -> PrefixTuningConfig:
        return PrefixTuningConfig(
            num_virtual_tokens=settings.num_virtual_tokens,
            prefix_projection=settings.projection,
            encoder_hidden_size=settings.projection_hidden_size,
            task_type=task_type,
        )

    return apply_prompt_learning(model, config, context)
