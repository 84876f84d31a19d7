"""Full fine-tuning: every weight trains; the saved "adapter" is the whole model. (What it does: _full.py.)"""

from __future__ import annotations

from typing import Literal

from adapters_impl.base import Deferred, Method, MethodSettings


class FullSettings(MethodSettings):
    name: Literal["full"] = "full"


METHOD = Method(
    name="full",
    summary="Full fine-tuning: every weight trains; most memory, the reference for quality",
    settings=FullSettings,
    apply=Deferred("adapters_impl._full", "apply"),
    save=Deferred("adapters_impl._full", "save"),
    load=Deferred("adapters_impl._full", "load"),
    merge=Deferred("adapters_impl._full", "merge"),
    whole_model=True,
    trains_new_tokens=True,
    fsdp=True,
    lighter=({"train.optim": "paged_adamw_8bit"}, {"method.name": "lora"}, {"method.name": "qlora"}),
)
