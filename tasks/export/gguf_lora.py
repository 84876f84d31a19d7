"""`--format gguf-lora`: the LoRA adapter alone in llama.cpp's adapter layout, with its base as a GGUF beside it.

The layout of llama.cpp's convert_lora_to_gguf.py: `general.type=adapter`, `adapter.type=lora`,
`adapter.lora.alpha`, and per adapted weight `<gguf name>.lora_a` (r x in) and `<gguf name>.lora_b` (out x r), the
q/k rows of `lora_b` permuted as the base's are. llama.cpp scales each pair by alpha / r, r read from the
tensor; where peft scaled a module otherwise (rsLoRA's alpha / sqrt(r), rank or alpha patterns) the ratio is folded
into `lora_b`, so the update is peft's exactly. `base.gguf` is the base the adapter applies to (llama.cpp:
`-m base.gguf --lora adapter.gguf`; Ollama: `FROM base.gguf` + `ADAPTER adapter.gguf`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters_impl import get_method
from tasks.errors import UserInputError
from tasks.export.gguf_model import (
    DEFAULT_QUANT,
    add_tensor,
    check_architecture,
    permute_rows,
    unpermute_rows,
    version_name,
    write_model_gguf,
)
from tasks.export.source import ExportSource, adapter_config

ADAPTER_FILE, BASE_FILE = "adapter.gguf", "base.gguf"
# Weight rebuild tolerance, as a fraction of the largest |merged weight|: the adapter's storage type's rounding.
WEIGHT_TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 1e-2}
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def check_lora(source: ExportSource) -> dict[str, Any]:
    """The adapter's peft config when llama.cpp can load it as a LoRA adapter.

    Raises:
        UserInputError: another method, DoRA, biases, whole saved modules or trained token rows (named, with
            `--format gguf` of the merged model as what works).
    """
    merged_instead = "use --format gguf (the merged model) instead"
    if get_method(source.method).lora_weights != "lora":
        raise UserInputError(
            f"--format gguf-lora: method {source.method!r} is not a LoRA adapter llama.cpp can load (it loads LoRA "
            f"only: not DoRA, IA3, prefix, prompt, bottleneck adapters or full fine-tuning); {merged_instead}"
        )
    config = adapter_config(source)
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA's magnitude vectors (use_dora)")
    if config.get("bias", "none") != "none":
        problems.append(f"trained biases (bias={config['bias']})")
    if config.get("modules_to_save"):
        problems.append(f"whole trained modules {config['modules_to_save']}")
    if config.get("trainable_token_indices"):
        problems.append("trained embedding rows for tokens the chat template added")
    if problems:
        raise UserInputError(
            f"--format gguf-lora: llama.cpp's LoRA adapters cannot carry {', '.join(problems)}; {merged_instead}"
        )
    return config


def lora_pairs(source: ExportSource) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name (as in the model's state dict, without `.weight`): (A, B)} from the adapter's safetensors."""
    from safetensors.torch import load_file

    assert source.adapter_dir is not None
    weights = load_file(str(source.adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise UserInputError(
                f"--format gguf-lora: the adapter holds {key!r}, not a LoRA A/B matrix; use --format gguf instead"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = tensor.to(torch.float32)
    return {module: (ab["A"], ab["B"]) for module, ab in pairs.items()}


def peft_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """The scale peft applies to this module's B @ A (alpha / r, rsLoRA's alpha / sqrt(r), alpha patterns)."""
    from peft.utils.other import get_pattern_key

    alpha = float(config["lora_alpha"])
    patterns = config.get("alpha_pattern") or {}
    if patterns:
        key = get_pattern_key(list(patterns), module)
        alpha = float(patterns.get(key, alpha))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def write_adapter_gguf(source: ExportSource, path: Path, quant: str, config: dict[str, Any]) -> dict[str, Any]:
    """adapter.gguf; returns {gguf weight name: (module, rank, llama.cpp's scale)} for the verification."""
    import gguf

    model_config = source.config
    check_architecture(model_config, "gguf-lora")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(model_config.num_hidden_layers))
    heads = int(model_config.num_attention_heads)
    kv_heads = int(model_config.num_key_value_heads or heads)
    alpha = float(config["lora_alpha"])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(version_name(source))
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    written: dict[str, Any] = {}
    for module, (a, b) in sorted(lora_pairs(source).items()):
        if module == "lm_head" and tied:
            raise UserInputError(
                "--format gguf-lora: the adapter changes lm_head, which this model ties to its embedding (llama.cpp "
                "has no separate output tensor to adapt); use --format gguf instead"
            )
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None:
            raise UserInputError(f"--format gguf-lora: no GGUF name for the adapted module {module!r}")
        rank = int(a.shape[0])
        # llama.cpp applies alpha / r; peft applied `scaling`: fold the difference into B.
        b = b * (peft_scaling(config, module, rank) / (alpha / rank))
        if module.endswith("self_attn.q_proj"):
            b = permute_rows(b, heads)
        elif module.endswith("self_attn.k_proj"):
            b = permute_rows(b, kv_heads)
        add_tensor(writer, f"{target}.lora_a", a.numpy(), quant)
        add_tensor(writer, f"{target}.lora_b", b.numpy(), quant)
        written[target] = {"module": module, "rank": rank}
    if not written:
        raise UserInputError("--format gguf-lora: the adapter holds no LoRA matrices")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def verify_adapter(source: ExportSource, path: Path, quant: str, written: dict[str, Any]) -> dict[str, Any]:
    """Read adapter.gguf with gguf.GGUFReader and rebuild every adapted weight as llama.cpp would (base + alpha/r *
    B @ A, q/k rows put back in transformers' order), against the merged model's weight."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    config = source.config
    heads = int(config.num_attention_heads)
    kv_heads = int(config.num_key_value_heads or heads)
    alpha = float(fields[gguf.Keys.Adapter.LORA_ALPHA])
    base = source.base_model.state_dict()
    merged = source.model.state_dict()
    diff, scale = 0.0, 0.0
    for target, entry in written.items():
        module = entry["module"]
        a = torch.from_numpy(np.array(tensors[f"{target}.lora_a"], dtype=np.float32))
        b = torch.from_numpy(np.array(tensors[f"{target}.lora_b"], dtype=np.float32))
        if module.endswith("self_attn.q_proj"):
            b = unpermute_rows(b, heads)
        elif module.endswith("self_attn.k_proj"):
            b = unpermute_rows(b, kv_heads)
        rebuilt = base[f"{module}.weight"] + (alpha / b.shape[1]) * (b @ a)
        expected = merged[f"{module}.weight"]
        diff = max(diff, float((rebuilt - expected).abs().max()))
        scale = max(scale, float(expected.abs().max()))
    tolerance = WEIGHT_TOLERANCE[quant] * max(scale, 1e-6)
    layout = (
        fields.get("general.type") == "adapter"
        and fields.get(gguf.Keys.Adapter.TYPE) == "lora"
        and fields.get("general.architecture") == "llama"
        and set(tensors) == {f"{t}.lora_{x}" for t in written for x in "ab"}
    )
    return {
        "adapter_layout": layout,
        "adapted_weights": len(written),
        "lora_alpha": alpha,
        "max_abs_weight_diff": diff,
        "weight_tolerance": tolerance,
        "weights_rebuilt": diff <= tolerance,
    }


def write_gguf_lora(source: ExportSource, staging: Path, quant: str | None) -> tuple[dict[str, Any], list[str]]:
    """adapter.gguf (verified by rebuilding the merged weights) and base.gguf (verified against the base)."""
    from tasks.export.verify import verify_gguf

    config = check_lora(source)
    quant = quant or DEFAULT_QUANT
    adapter_quant = "f32" if quant == "q8_0" else quant  # small, and its rows are often too short for Q8_0 blocks
    written = write_adapter_gguf(source, staging / ADAPTER_FILE, adapter_quant, config)
    checks = verify_adapter(source, staging / ADAPTER_FILE, adapter_quant, written)
    base = source.base_model
    write_model_gguf(staging / BASE_FILE, base, source.tokenizer, source.tokenizer_dir, source.template, quant,
                     f"{version_name(source)}-base")  # fmt: skip
    base_checks = verify_gguf(source, staging / BASE_FILE, quant, reference=base)
    checks |= {f"base_{key}": value for key, value in base_checks.items()}
    checks["quant"] = quant
    notes = [f"llama.cpp: llama-cli -m {BASE_FILE} --lora {ADAPTER_FILE}"]
    if get_method(source.method).quantized_base:
        notes.append(
            f"{source.method}: base.gguf is the full-precision base; the adapter was trained on its 4-bit form"
        )
    return checks, notes
