"""What QLoRA does to a model: a 4-bit base (bitsandbytes) with LoRA; its settings and rules are in qlora.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training, set_peft_model_state_dict
from torch import nn
from transformers import BitsAndBytesConfig

from adapters_impl._lora import lora_config
from adapters_impl._peft import load_peft
from adapters_impl._weights import HEAD_NAMES
from adapters_impl.base import ApplyContext
from adapters_impl.qlora import QLoraSettings


def quantized_loading(settings: QLoraSettings) -> dict[str, Any]:
    """`from_pretrained` arguments for a 4-bit base; output layers stay in full precision."""
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=settings.quant_type,
            bnb_4bit_use_double_quant=settings.double_quant,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["lm_head", *HEAD_NAMES],
        )
    }


def dequantizing_inference(model: nn.Module) -> nn.Module:
    """Every 4-bit layer computes inference as training does (dequantize, fp32 matmul), whatever its shape.

    bitsandbytes' `Linear4bit.forward` takes its CPU inference kernel when the input is on the CPU, the layer is in
    eval mode, the input needs no grad and the CPU has AVX512-BF16 (`support_avx512bf16_for_cpu`). It repacks the
    weight first, asserting out_features % 32 == 0 ("N must be divisible by block_n") and an even in_features, so
    shapes training took (e.g. 172) crash in evaluation; and it computes in bf16 whatever the compute dtype. Turned
    off, eval, generation and the merge check compute what training computes. GPUs never take that kernel.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def apply(model: nn.Module, settings: QLoraSettings, context: ApplyContext) -> nn.Module:
    """Prepare the 4-bit base for training (norms in fp32, input grads), then add LoRA."""
    config = lora_config(settings, model, context, use_dora=False)
    prepared = prepare_model_for_kbit_training(
        dequantizing_inference(model),
        use_gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return get_peft_model(prepared, config)  # type: ignore[arg-type]


def load(base: nn.Module, directory: Path, trainable: bool) -> nn.Module:
    base = dequantizing_inference(base)
    if trainable:
        base = prepare_model_for_kbit_training(base)
    return load_peft(base, directory, trainable)


def merge(model: nn.Module, full_precision_base: Callable[[], nn.Module]) -> nn.Module:
    """The trained LoRA weights on a full-precision base, merged there."""
    config = model.peft_config["default"]  # type: ignore[index]
    fresh = get_peft_model(full_precision_base(), config)  # type: ignore[arg-type]
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))  # type: ignore[arg-type]
    return fresh.merge_and_unload()  # type: ignore[operator]
