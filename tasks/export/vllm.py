"""`--format vllm-check`: what vLLM's LoRA serving would refuse or treat differently, and the command to serve it.

vLLM serves peft LoRA adapters (`--enable-lora --lora-modules NAME=PATH`) on linear layers, up to `--max-lora-rank`
(one of a fixed set of sizes, 16 by default). It has no DoRA, IA3, prefix, prompt or bottleneck-adapter serving, no
trained biases, and serves an adapter with the base's tokenizer and embedding: rows a chat template added and
trained do not reach it. Where the adapter cannot be served as one, the report says so and gives the merged form
(`--format hf-merged`) to serve instead. The adapter folder written here (peft's files and the tokenizer) is
checked by loading it onto the base with peft: the same logits as the merged model.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import torch

from adapters_impl import get_method
from tasks.export.source import ExportSource, adapter_config
from tasks.export.verify import compare_logits, encoded

# vLLM's accepted --max-lora-rank values (vllm/config/lora.py); 16 is its default.
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16
SERVABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FOLDER = "adapter"


def lora_problems(source: ExportSource, config: dict[str, Any]) -> tuple[list[str], list[str], dict[str, Any]]:
    """(blocking problems, differences in serving, facts) for a LoRA-family adapter."""
    blocking, different = [], []
    targets = config.get("target_modules") or []
    targets = sorted(targets) if isinstance(targets, list) else [str(targets)]
    ranks = [int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    needed = next((r for r in MAX_LORA_RANKS if r >= rank), None)
    facts: dict[str, Any] = {
        "rank": rank,
        "max_lora_rank": needed,
        "target_modules": targets,
        "bias": config.get("bias"),
    }
    if needed is None:
        blocking.append(f"rank {rank} is above vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]})")
    elif needed > DEFAULT_MAX_LORA_RANK:
        different.append(f"rank {rank} is above vLLM's default --max-lora-rank {DEFAULT_MAX_LORA_RANK}: pass {needed}")
    if config.get("use_dora"):
        blocking.append("DoRA (use_dora): vLLM serves plain LoRA only")
    if config.get("bias", "none") != "none":
        blocking.append(f"trained biases (bias={config['bias']}): vLLM's LoRA layers add none")
    unknown = [t for t in targets if t not in SERVABLE_MODULES]
    if unknown:
        blocking.append(f"target modules {unknown}: vLLM's LoRA serves the linear layers {', '.join(SERVABLE_MODULES)}")
    if config.get("modules_to_save"):
        blocking.append(f"whole trained modules {config['modules_to_save']} (modules_to_save)")
    if config.get("trainable_token_indices"):
        rows = config["trainable_token_indices"]
        blocking.append(
            f"trained embedding rows {rows} (tokens the chat template added): vLLM serves the base's embedding"
        )
    added = tokens_beyond_base(source)
    facts["added_tokens"] = added
    if added and not config.get("trainable_token_indices"):
        different.append(f"tokens added to the base's tokenizer {added}: vLLM uses the base's vocabulary")
    return blocking, different, facts


def tokens_beyond_base(source: ExportSource) -> list[str]:
    """Tokens the version's tokenizer has beyond the base's embedding (a chat template's, such as chatml's)."""
    from transformers import AutoConfig

    where, revision = source.base_location, source.info["base"].get("revision")
    rows = int(AutoConfig.from_pretrained(where, revision=revision).vocab_size)
    return sorted(t for t, i in source.tokenizer.get_vocab().items() if i >= rows)


def verify_adapter_folder(source: ExportSource, folder: Path) -> dict[str, Any]:
    """The written adapter loaded onto the base with peft (as vLLM loads peft files) gives the merged logits."""
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(source.base_model), str(folder)).eval()
    with torch.no_grad():
        return compare_logits(source.model, model, encoded(source), "f32")


def write_vllm_check(source: ExportSource, staging: Path, quant: str | None) -> tuple[dict[str, Any], list[str]]:
    """report.json, the adapter folder for `--lora-modules` when it is servable, and the command."""
    name = source.uri.removeprefix("models:/").split("/")[0].split("@")[0] or "adaptflow"
    # The report is information (what vLLM refuses is no failed check); the adapter folder's logits are checked.
    report: dict[str, Any] = {"method": source.method}
    checks: dict[str, Any] = {}
    notes: list[str] = []
    if get_method(source.method).lora_weights is not None:
        config = adapter_config(source)
        blocking, different, facts = lora_problems(source, config)
        report |= facts
    else:
        blocking = [f"method {source.method!r}: vLLM's LoRA serving loads LoRA adapters only"]
        different = []
    report |= {"refused": blocking, "different": different, "servable_as_lora": not blocking}
    out = staging / ADAPTER_FOLDER
    if not blocking:
        shutil.copytree(source.adapter_dir, out)  # type: ignore[arg-type]
        source.tokenizer.save_pretrained(str(out))
        checks |= {f"adapter_{k}": v for k, v in verify_adapter_folder(source, out).items()}
        command = [
            "vllm", "serve", source.base_location, "--enable-lora",
            "--lora-modules", f"{name}={out.name}", "--max-lora-rank", str(report["max_lora_rank"]),
        ]  # fmt: skip
        if source.template:
            (staging / "chat_template.jinja").write_text(source.template)
            command += ["--chat-template", "chat_template.jinja"]
    else:
        command = ["adaptflow", "export", source.uri, "--format", "hf-merged", "--out", "merged", "&&"]
        command += ["vllm", "serve", "merged"]
    report["command"] = " ".join(shlex.quote(w) if w != "&&" else w for w in command)
    (staging / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    checks["report"] = report
    notes.append(f"serve (from this folder): {report['command']}")
    return checks, notes
