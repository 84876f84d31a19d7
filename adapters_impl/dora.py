"""DoRA: LoRA on the direction of each weight plus a trained magnitude vector (peft `use_dora`). (What it does:
_dora.py.)"""

from __future__ import annotations

from typing import Literal

from adapters_impl.base import Deferred, Method
from adapters_impl.lora import LowRankSettings


class DoraSettings(LowRankSettings):
    name: Literal["dora"] = "dora"


METHOD = Method(
    name="dora",
    summary="DoRA: weight-decomposed LoRA (magnitude + low-rank direction); merges exactly",
    settings=DoraSettings,
    apply=Deferred("adapters_impl._dora", "apply"),
    save=Deferred("adapters_impl._peft", "save_peft"),
    load=Deferred("adapters_impl._peft", "load_peft"),
    merge=Deferred("adapters_impl._peft", "merge_peft"),
    trains_new_tokens=True,
    lora_weights="dora",
    lighter=({"method.name": "qlora"},),
)
