"""IA3: learned rescaling vectors on keys, values and the feed-forward input (peft); merges exactly."""

from __future__ import annotations

from typing import Literal

from peft import IA3Config, get_peft_model
from pydantic import Field
from torch import nn

from adapters_impl._peft import load_peft, merge_peft, peft_task, resolve_target_modules, save_peft
from adapters_impl.base import ApplyContext, Method, MethodSettings, MethodSettingsError


class IA3Settings(MethodSettings):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"], description="linear layers whose output is rescaled"
    )
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="of those, the feed-forward layers (rescaled on their input instead)",
    )


def apply(model: nn.Module, settings: IA3Settings, context: ApplyContext) -> nn.Module:
    targets = resolve_target_modules(model, settings.target_modules, "method.target_modules")
    feedforward = resolve_target_modules(model, settings.feedforward_modules, "method.feedforward_modules")
    if not set(feedforward) <= set(targets):
        raise MethodSettingsError(
            f"method.feedforward_modules: {sorted(set(feedforward) - set(targets))} must also be in method.target_modules"
        )
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=peft_task(model))
    return get_peft_model(model, config)  # type: ignore[arg-type]


METHOD = Method(
    name="ia3",
    summary="IA3: learned scaling vectors on keys, values and feed-forward inputs; fewest weights, merges exactly",
    settings=IA3Settings,
    apply=apply,
    save=save_peft,
    load=load_peft,
    merge=merge_peft,
)
