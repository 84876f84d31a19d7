"""The memory plan (tasks/memory.py) against the peak torch measures for the same training step: `make bench`'s
memory_plan section, on a 27M-parameter Llama built from a config.

    python -m benchmarks.memory_plan [MODEL_FOLDER]    # prints planned / measured per case
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import torch

from adapters_impl import ApplyContext, get_method
from tasks.config import RunConfig
from tasks.modeling import load_base_model, load_tokenizer, resolve_model
from tasks.objectives import OBJECTIVES
from tasks.training import enable_activation_checkpointing


def measured_peak(config: RunConfig) -> int:
    """Peak bytes of live CPU tensors over two training steps of the run's model (torch.profiler's memory timeline):
    the base loaded and the method applied as the run does, AdamW, a batch of the config's shape."""
    from torch.profiler import ProfilerActivity, profile

    source = resolve_model(config.model)
    method = get_method(config.method.name)
    labels = ["a", "b"] if config.task == "classification" else None
    base = load_base_model(
        source, OBJECTIVES[config.task].head, load_tokenizer(source), labels, **method.base_loading(config.method)
    )
    model = method.apply(base, config.method, ApplyContext(task=config.task, model_path=source.name_or_path))
    if config.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    rows, length = config.train.batch_size, config.data.max_length
    ids = torch.randint(4, int(base.config.vocab_size), (rows, length))
    labels_ = torch.randint(0, 2, (rows,)) if config.task == "classification" else ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        for _ in range(2):  # the second step holds the optimizer state
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels_).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as folder:
        timeline = Path(folder) / "timeline.raw.json.gz"
        prof.export_memory_timeline(str(timeline), device="cpu")
        events = sorted(json.loads(gzip.decompress(timeline.read_bytes())), key=lambda event: event[0])
    live = peak = 0
    for _, action, size, _ in events:  # sizes are negative for frees; action 3 only bumps a version
        if action != 3:
            live += size
            peak = max(peak, live)
    return peak


def compare(model: str, cases: list[tuple[str, bool]], batch: int = 8, length: int = 256) -> list[dict[str, object]]:
    """Planned and measured peak MiB of each (method, checkpointing) on `model` (CPU, fp32, AdamW)."""
    from tasks.memory import Device, plan

    rows = []
    for method, checkpointing in cases:
        config = RunConfig.model_validate(
            {
                "model": {"name_or_path": model},
                "method": {"name": method},
                "data": {"train": "unused.jsonl", "max_length": length},
                "train": {"batch_size": batch, "gradient_checkpointing": checkpointing, "max_steps": 2},
            }
        )
        planned = plan(config, Device("cpu", "cpu", 2**40, False), suggest=0).peak_bytes
        measured = measured_peak(config)
        rows.append(
            {
                "method": method,
                "gradient_checkpointing": checkpointing,
                "batch": batch,
                "max_length": length,
                "planned_mib": round(planned / 2**20, 1),
                "measured_mib": round(measured / 2**20, 1),
                "ratio": round(planned / measured, 3),
            }
        )
    return rows


# qlora checkpoints by default (its own setting); prefix tuning cannot.
CASES = [("lora", False), ("lora", True), ("full", False), ("full", True), ("qlora", True), ("ia3", False),
         ("ia3", True), ("prefix", False)]  # fmt: skip


def build_model(folder: Path) -> int:
    """A 27M-parameter Llama (hidden 512, 6 layers, vocab 8000) with the builtin tokenizer; its parameter count."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.modeling import builtin_model_path

    folder.mkdir(parents=True, exist_ok=True)
    for file in builtin_model_path("tiny").iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, folder)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000, pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(work: Path) -> dict[str, object]:
    """The section: every case on the 27M model, batch 8 x 256 tokens."""
    params = build_model(work / "plan-model")
    return {"model_params": params, "rows": compare(str(work / "plan-model"), CASES)}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        for row in compare(sys.argv[1], CASES):
            print(json.dumps(row))
    else:
        print(json.dumps(run(Path(tempfile.mkdtemp(prefix="adaptflow-plan-")))))
