"""QLoRA: LoRA on a base quantized to 4-bit NF4 with double quantization (bitsandbytes).

It is LoRA with a quantization setting: the base is loaded quantized (`base_loading`), then LoRA applies as usual.
Merging into the 4-bit base would re-quantize silently (peft "succeeds" lossy), so the adapter is merged into a
full-precision reload of the base instead, and the run measures what that changes on the eval set. (What it does:
_qlora.py.)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters_impl.base import Deferred, Method
from adapters_impl.lora import LowRankSettings


class QLoraSettings(LowRankSettings):
    name: Literal["qlora"] = "qlora"
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base")
    double_quant: bool = Field(True, description="quantize the quantization constants too")
    gradient_checkpointing: bool = Field(True, description="recompute activations to save memory")


METHOD = Method(
    name="qlora",
    summary="QLoRA: LoRA on a 4-bit NF4 base (bitsandbytes); merged into a full-precision reload of the base",
    settings=QLoraSettings,
    apply=Deferred("adapters_impl._qlora", "apply"),
    save=Deferred("adapters_impl._peft", "save_peft"),
    load=Deferred("adapters_impl._qlora", "load"),
    merge=Deferred("adapters_impl._qlora", "merge"),
    base_loading=Deferred("adapters_impl._qlora", "quantized_loading"),
    lossy_merge=True,
    lora_weights="lora",
    quantized_base=True,
    trains_new_tokens=True,
    fsdp_problem=(
        "its 4-bit base would need bitsandbytes' quant storage in the training dtype on CUDA, which adaptflow does "
        "not set up"
    ),
)
