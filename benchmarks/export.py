"""Export on the real model (issue 29): per format and quantization, the time `export_source` takes (writing and its
own verification), the time writing alone takes (GGUF), the files' size, and the artifact read back against the
merged HF model: max |logit difference| and greedy-token agreement over N chat prompts.

    python -m benchmarks.export [--prompts 8] [--tokens 16] [--formats gguf,gguf-lora,ollama,ollama-lora,vllm-check,hf-merged]

The version is `builtin:smollm2-135m-instruct` with a LoRA adapter made by peft with a fixed seed (r 8, alpha 16,
all linear layers, B drawn from N(0, 0.01²): a perturbation of the size a short run leaves), packaged as `adaptflow
run` registers it, with the model's own chat template. Each artifact is read back by another reader than the one
that wrote it: GGUF by transformers' GGUF loader (dequantized to float32); the LoRA GGUF as llama.cpp applies it
(base.gguf through that loader, plus alpha / r · B·A from adapter.gguf read with gguf.GGUFReader); vllm-check's
adapter folder by peft onto the base; hf-merged by `from_pretrained`. llama.cpp itself is not run:
llama-cpp-python has no wheel on PyPI (it builds from source). Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (format, quant) pairs measured: the merged GGUF's 16- and 8-bit types (f32 is rounding alone, hf-merged the
# float32 model itself: both left out to keep the run short on 2 shared cores), then the other formats.
CASES = [("gguf", "f16"), ("gguf", "bf16"), ("gguf", "q8_0"), ("gguf-lora", "f16"), ("ollama", "f16"),
         ("ollama-lora", "f16"), ("vllm-check", None)]  # fmt: skip
QUESTIONS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Write a haiku about autumn leaves.",
    "Explain what a prime number is to a child.",
    "How do I boil an egg?",
    "Name two planets in the solar system and one fact about each.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue? Answer in one sentence.",
    "Suggest a name for a small bakery.",
    "What is 12 times 7?",
    "Summarise the plot of Cinderella in two sentences.",
    "List three uses of a paper clip.",
]


def log(message: str) -> None:
    print(message, flush=True, file=__import__("sys").stderr)


def make_package(folder: Path, base: Path) -> Path:
    """A LoRA version's package of `base` in the registered layout, its adapter made by peft with seed 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters_impl.packaged import INFO_FILE, folder_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=ADAPTED, init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)
    folder.mkdir(parents=True)
    peft_model.save_pretrained(str(folder / "adapter"))
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    chat = {"name": "tokenizer", "source": tokenizer.chat_template, "end_of_turn": "<|im_end|>"}
    base_pin = {"kind": "tracking", "fingerprint": folder_fingerprint(base), "run_id": "-", "path": "base",
                "logged_from": str(base), "local_path": str(base)}  # fmt: skip
    info = {"task": "instruction", "method": "lora", "label_names": None, "generation": {"max_new_tokens": 32},
            "weights": None, "tokenizer": "tokenizer", "adapter": "adapter", "base": base_pin, "allow_pickle": False,
            "chat": chat}  # fmt: skip
    (folder / INFO_FILE).write_text(json.dumps(info))
    return folder


def lora_gguf_model(source: Any, folder: Path) -> nn.Module:
    """What llama.cpp runs for `-m base.gguf --lora adapter.gguf`: base.gguf as transformers reads it, each adapted
    weight plus alpha / r · B·A from adapter.gguf (q/k rows put back in transformers' order)."""
    import gguf
    import numpy as np

    from tasks.export.gguf_lora import ADAPTER_FILE, BASE_FILE
    from tasks.export.gguf_model import unpermute_rows
    from tasks.export.verify import load_gguf

    model, _ = load_gguf(folder / BASE_FILE)
    reader = gguf.GGUFReader(str(folder / ADAPTER_FILE))
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(source.config.num_hidden_layers))
    config = source.config
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
    state = model.state_dict()
    with torch.no_grad():
        for key, weight in state.items():
            target = names.get_name(key, try_suffixes=(".weight",))
            if target is None or f"{target}.lora_a" not in tensors:
                continue
            a = torch.from_numpy(np.array(tensors[f"{target}.lora_a"], dtype=np.float32))
            b = torch.from_numpy(np.array(tensors[f"{target}.lora_b"], dtype=np.float32))
            if key.endswith("self_attn.q_proj.weight"):
                b = unpermute_rows(b, heads)
            elif key.endswith("self_attn.k_proj.weight"):
                b = unpermute_rows(b, kv_heads)
            weight += (alpha / b.shape[1]) * (b @ a)
    return model.eval()


def read_back(source: Any, fmt: str, folder: Path) -> nn.Module:
    """The exported artifact as a model, read by another reader than its writer."""
    from transformers import AutoModelForCausalLM

    from tasks.export.gguf_model import FILE_NAME
    from tasks.export.verify import load_gguf

    if fmt in ("gguf", "ollama"):
        return load_gguf(folder / FILE_NAME)[0].eval()
    if fmt in ("gguf-lora", "ollama-lora"):
        return lora_gguf_model(source, folder)
    if fmt == "vllm-check":
        from peft import PeftModel

        from tasks.export.vllm import ADAPTER_FOLDER

        base = AutoModelForCausalLM.from_pretrained(source.base_location, dtype=torch.float32)
        return PeftModel.from_pretrained(base, str(folder / ADAPTER_FOLDER)).merge_and_unload().eval()  # type: ignore[no-any-return]
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@torch.no_grad()
def reference_run(model: nn.Module, prompts: list[list[int]], tokens: int, pad: int) -> list[dict[str, Any]]:
    """The merged HF model's greedy continuation of each prompt and its logits over prompt + continuation."""
    runs = []
    for ids in prompts:
        batch = torch.tensor([ids])
        out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=tokens, min_new_tokens=tokens,  # type: ignore[operator]
                             do_sample=False, pad_token_id=pad)[0].tolist()  # fmt: skip
        runs.append({"ids": ids, "greedy": out[len(ids) :], "logits": model(torch.tensor([out])).logits[0]})
    return runs


@torch.no_grad()
def agreement(candidate: nn.Module, reference: list[dict[str, Any]], tokens: int, pad: int) -> dict[str, Any]:
    """Max |logit difference| on the reference's sequences (teacher-forced, so a divergence does not compound), and
    greedy agreement: prompts whose continuation is identical, and the tokens before the first difference."""
    diff, scale, identical, before_parting = 0.0, 0.0, 0, 0
    for run in reference:
        ids = run["ids"]
        sequence = torch.tensor([ids + run["greedy"]])
        diff = max(diff, float((candidate(sequence).logits[0] - run["logits"]).abs().max()))
        scale = max(scale, float(run["logits"].abs().max()))
        batch = torch.tensor([ids])
        out = candidate.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=tokens,  # type: ignore[operator]
                                 min_new_tokens=tokens, do_sample=False, pad_token_id=pad)[0, len(ids) :].tolist()  # fmt: skip
        identical += out == run["greedy"]
        before_parting += next((i for i, (a, b) in enumerate(zip(out, run["greedy"], strict=False)) if a != b), tokens)
    return {
        "max_abs_logit_diff": round(diff, 5),
        "max_abs_logit": round(scale, 2),
        "greedy_identical_prompts": identical,
        "greedy_token_agreement": round(before_parting / (tokens * len(reference)), 4),
    }


def write_seconds(source: Any, quant: str, work: Path) -> float:
    """Writing the merged GGUF alone, without the verification `export_source` runs after it."""
    from tasks.export.gguf_model import version_name, write_model_gguf

    path = work / f"write-only-{quant}.gguf"
    started = time.perf_counter()
    write_model_gguf(path, source.model, source.tokenizer, source.tokenizer_dir, source.template, quant,
                     version_name(source))  # fmt: skip
    seconds = time.perf_counter() - started
    path.unlink()
    return round(seconds, 2)


def run(work: Path, prompts: int = 8, tokens: int = 16, formats: list[str] | None = None) -> dict[str, Any]:
    """Every (format, quant) case of CASES on the real model; the section of benchmarks/results.json."""
    from tasks.export import export_source
    from tasks.export.source import load_source
    from tasks.modeling import builtin_model_path

    load_before = os.getloadavg()
    base = builtin_model_path("smollm2-135m-instruct")
    package = make_package(work / "package", Path(base))
    source = load_source(str(package))
    tokenizer = source.tokenizer
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:prompts]]
    prompt_ids = [list(tokenizer(source.render(c, True), add_special_tokens=False)["input_ids"]) for c in chats]
    log(f"export: reference greedy runs of the merged HF model ({prompts} prompts x {tokens} tokens)")
    reference = reference_run(source.model, prompt_ids, tokens, tokenizer.pad_token_id or tokenizer.eos_token_id)
    rows = []
    for fmt, quant in CASES:
        if formats and fmt not in formats:
            continue
        out = work / f"{fmt}-{quant}"
        log(f"export: {fmt} {quant or ''}")
        record = export_source(source, fmt, quant, out, force=True)
        row: dict[str, Any] = {
            "format": fmt,
            "quant": record.quant,
            "export_seconds": round(record.seconds, 2),
            "bytes": record.bytes,
            "files": {f: (out / f).stat().st_size for f in record.files},
            "verified": record.verified,
            "failed": record.failed,
        }
        if fmt == "gguf":
            row["write_seconds"] = write_seconds(source, str(record.quant), work)
        checks = record.checks
        for key in ("max_abs_logit_diff", "logit_tolerance", "greedy_match", "max_abs_weight_diff",
                    "template_renders_same", "base_max_abs_logit_diff"):  # fmt: skip
            if key in checks:
                row[f"check_{key}"] = checks[key]
        candidate = read_back(source, fmt, out)
        row |= agreement(candidate, reference, tokens, tokenizer.pad_token_id or tokenizer.eos_token_id)
        del candidate
        shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        log(f"export: {json.dumps(row)}")
    return {
        "model": "builtin:smollm2-135m-instruct + a seeded peft LoRA (r 8, alpha 16, all linear, B ~ N(0, 0.01²))",
        "prompts": prompts,
        "tokens": tokens,
        "torch_threads": torch.get_num_threads(),
        "load": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
        "llama_cpp": "not run: llama-cpp-python has no wheel on PyPI (it builds from source)",
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--formats", default="", help="comma-separated formats (default: all)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adaptflow-bench-export-"))
    try:
        result = run(work, args.prompts, args.tokens, [f for f in args.formats.split(",") if f] or None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
