"""`--format hf-merged`: a Hugging Face folder with the adapter merged (safetensors, tokenizer, chat template)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from tasks.export.source import ExportSource, require_merged

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def write_hf_merged(source: ExportSource, staging: Path, quant: str | None) -> tuple[dict[str, Any], list[str]]:
    """The merged model in `quant`'s dtype (default float32, what the merge check computed in), the tokenizer
    with the training chat template as its own, reloaded and compared."""
    from tasks.export.verify import verify_hf_folder

    require_merged(source, "hf-merged")
    quant = quant or "f32"
    model = source.model if quant == "f32" else copy.deepcopy(source.model).to(DTYPES[quant])
    model.save_pretrained(str(staging), safe_serialization=True)  # type: ignore[operator]
    tokenizer = copy.copy(source.tokenizer)
    if source.template:  # the template the version was trained with, not the base's
        tokenizer.chat_template = source.template
    tokenizer.save_pretrained(str(staging))
    checks = verify_hf_folder(source, staging, quant)
    checks["quant"] = quant
    return checks, []
