"""What IA3 does to a model (peft); its settings and rules are in ia3.py."""

from __future__ import annotations

from peft import IA3Config, get_peft_model
from torch import nn

from adapters_impl._peft import peft_task, resolve_target_modules
from adapters_impl.base import ApplyContext, MethodSettingsError
from adapters_impl.ia3 import IA3Settings


def apply(model: nn.Module, settings: IA3Settings, context: ApplyContext) -> nn.Module:
    targets = resolve_target_modules(model, settings.target_modules, "method.target_modules")
    feedforward = resolve_target_modules(model, settings.feedforward_modules, "method.feedforward_modules")
    if not set(feedforward) <= set(targets):
        raise MethodSettingsError(
            f"method.feedforward_modules: {sorted(set(feedforward) - set(targets))} must also be in method.target_modules"
        )
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=peft_task(model))
    return get_peft_model(model, config)  # type: ignore[arg-type]
