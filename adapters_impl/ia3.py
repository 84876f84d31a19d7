"""IA3: learned rescaling vectors on keys, values and the feed-forward input (peft); merges exactly. (What it does:
_ia3.py.)"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters_impl.base import Deferred, Method, MethodSettings


class IA3Settings(MethodSettings):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"], description="linear layers whose output is rescaled"
    )
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="of those, the feed-forward layers (rescaled on their input instead)",
    )


METHOD = Method(
    name="ia3",
    summary="IA3: learned scaling vectors on keys, values and feed-forward inputs; fewest weights, merges exactly",
    settings=IA3Settings,
    apply=Deferred("adapters_impl._ia3", "apply"),
    save=Deferred("adapters_impl._peft", "save_peft"),
    load=Deferred("adapters_impl._peft", "load_peft"),
    merge=Deferred("adapters_impl._peft", "merge_peft"),
)
