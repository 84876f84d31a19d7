"""Peak training memory: full fine-tuning vs LoRA vs QLoRA on a ~70M-parameter Llama built from a config.

Each method trains in its own process. On CPU: the resident-memory high-water mark during training (reset
after loading, so the loader's transient copies do not count) above the process's size after imports; on
CUDA, peak allocated memory. Same model, batch, sequence length and steps for all three.

    python -m benchmarks.memory [--steps 3] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ["full", "lora", "qlora"]


def build_model(folder: Path) -> int:
    """A randomly initialised Llama of ~70M parameters (hidden 640, 10 layers, vocab 32000), saved HF-style."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=640,
        intermediate_size=1728,
        num_hidden_layers=10,
        num_attention_heads=10,
        num_key_value_heads=10,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident memory now (Linux), else the high-water mark."""
    return _status_mb("VmRSS")


def reset_peak() -> None:
    """Forget the high-water mark (Linux), so that loading the model's transient copies do not count.

    First hand freed heap memory back to the OS (glibc keeps it resident otherwise).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def measure_one(method_name: str, folder: Path, steps: int, batch: int, seq: int) -> dict[str, Any]:
    """Load, apply the method, train `steps` steps on random tokens; report peak memory and time per step."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapters_impl import ApplyContext, count_parameters, get_method

    cuda = torch.cuda.is_available()
    before = rss_mb()  # after the imports: what remains is the model, its training state and activations
    method = get_method(method_name)
    settings = method.settings(name=method_name)
    if method_name != "full":
        settings = method.settings(name=method_name, target_modules="all-linear")
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **method.base_loading(settings))
    model = method.apply(base, settings, ApplyContext(task="causal_lm", model_path=str(folder)))
    if cuda:
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
    trainable, total = count_parameters(model)
    gc.collect()
    reset_peak()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:  # what autograd stores for the backward pass
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    started = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, 32000, (batch, seq), generator=generator)
        if cuda:
            ids = ids.cuda()
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the grads allocated, as they are at the peak
    seconds = (time.perf_counter() - started) / steps
    mb = 2**-20
    weights = sum(t.untyped_storage().nbytes() for t in {*model.parameters(), *model.buffers()}) * mb
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None) * mb
    states = optimizer.state.values()
    optimizer_mb = sum(v.untyped_storage().nbytes() for s in states for v in s.values() if torch.is_tensor(v)) * mb
    activations = sum(saved.values()) * mb
    tensors = weights + grads + optimizer_mb + activations
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_mb() - before
    return {
        "method": method_name,
        "peak_memory_mb": round(peak, 1),
        "tensor_memory_mb": round(tensors, 1),
        "weights_mb": round(weights, 1),
        "grads_mb": round(grads, 1),
        "optimizer_mb": round(optimizer_mb, 1),
        "activations_mb": round(activations, 1),
        "seconds_per_step": round(seconds, 3),
        "trainable_params": trainable,
        "total_params": total,
        "device": "cuda" if cuda else "cpu",
    }


def run(steps: int = 3, batch: int = 4, seq: int = 128) -> dict[str, Any]:
    """Every method in a fresh process; ratios against full fine-tuning."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        params = build_model(folder)
        rows = []
        for name in METHODS:
            command = [sys.executable, "-m", "benchmarks.memory", "--one", name, "--folder", str(folder)]
            command += ["--steps", str(steps), "--batch", str(batch), "--seq", str(seq)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    full = next(r for r in rows if r["method"] == "full")
    for row in rows:
        row["memory_vs_full"] = round(row["peak_memory_mb"] / full["peak_memory_mb"], 3)
        row["tensor_memory_vs_full"] = round(row["tensor_memory_mb"] / full["tensor_memory_mb"], 3)
    return {"model_params": params, "steps": steps, "batch": batch, "seq": seq, "methods": rows}


def print_table(result: dict[str, Any]) -> None:
    print(
        f"peak training memory, {result['model_params'] / 1e6:.0f}M-parameter Llama, batch {result['batch']} x {result['seq']}"
    )
    print("tensors = weights + grads + optimizer state + saved activations (exact); peak = process high-water")
    header = ["method", "tensors MB", "vs full", "weights", "grads", "optim", "activ", "peak MB", "vs full", "s/step"]
    print(" ".join(f"{h:>10s}" for h in header))
    for r in result["methods"]:
        values = [
            r["tensor_memory_mb"],
            r["tensor_memory_vs_full"],
            r["weights_mb"],
            r["grads_mb"],
            r["optimizer_mb"],
            r["activations_mb"],
            r["peak_memory_mb"],
            r["memory_vs_full"],
            r["seconds_per_step"],
        ]
        print(f"{r['method']:>10s} " + " ".join(f"{v:10.3f}" if v < 10 else f"{v:10.1f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, Path(args.folder), args.steps, args.batch, args.seq)))
        return
    result = run(args.steps, args.batch, args.seq)
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
