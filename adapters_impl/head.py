"""A frozen base with a trained classification head, pooled on the last non-padding token. (What it does:
_head.py.)"""

from __future__ import annotations

from typing import Literal

from adapters_impl.base import Deferred, Method, MethodSettings


class HeadSettings(MethodSettings):
    name: Literal["head"] = "head"


METHOD = Method(
    name="head",
    summary="Frozen base + a trained classification head (linear probe); classification only",
    settings=HeadSettings,
    apply=Deferred("adapters_impl._head", "apply"),
    save=Deferred("adapters_impl._head", "save"),
    load=Deferred("adapters_impl._head", "load"),
    merge=Deferred("adapters_impl._head", "merge"),
    unsupported={
        "causal_lm": "a frozen base with a new head only classifies; to generate text use lora, full or another method",
    },
)
