"""The benchmarks' shared harness: the bench model, isolated adaptflow runs, the plain-script comparison
(alternated, with ratios) and its A/A control. benchmarks/run.py and the section modules import it."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLES = ROOT / "tasks" / "builtin" / "sample_stories.jsonl"
METHODS = ["lora", "full", "qlora", "ia3", "prefix"]
# What an `adaptflow run` imports (the flows, MLflow's SQL store, the plotting library), and the plain script.
PIPELINE_IMPORTS = "import flows.finetune, mlflow.store.tracking.sqlalchemy_store, matplotlib.pyplot"
PLAIN_IMPORTS = "import benchmarks.plain_trainer"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_bench_model(folder: Path) -> int:
    """A ~3M-parameter Llama (hidden 256, 4 layers) with the builtin tokenizer: big enough to measure."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.modeling import builtin_model_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("tiny"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def isolated_env(work: Path) -> dict[str, str]:
    """A private MLflow store and Prefect home per benchmark, like a fresh machine."""
    env = {**os.environ, "ADAPTFLOW_MLFLOW_DIR": str(work / "mlflow"), "PREFECT_HOME": str(work / "prefect")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return env


def adaptflow(args: list[str], work: Path) -> tuple[dict[str, Any], float]:
    """Run the CLI in its own process; (its JSON, wall seconds)."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "adaptflow"), *args, "--json"], env=isolated_env(work), cwd=work, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"adaptflow {' '.join(args)} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def write_config(path: Path, model: str, method: str, steps: int, batch: int, max_length: int) -> Path:
    """The pipeline's side of "the same work": all of SAMPLES for training (a separate eval file), so that
    with the same seeds both sides see the same batches in the same order."""
    eval_file = path.parent / "eval.jsonl"
    eval_file.write_text("\n".join(SAMPLES.read_text().splitlines()[:40]) + "\n")
    path.write_text(
        json.dumps(
            {
                "model": {"name_or_path": model},
                "data": {"train": str(SAMPLES), "eval": str(eval_file), "max_length": max_length},
                "method": {"name": method},
                "train": {"max_steps": steps, "batch_size": batch, "learning_rate": 3e-3, "save_steps": 10 * steps},
                "registry": {"name": f"bench-{method}"},
                "bias_probe": {"suite": None},
            }
        )
    )
    return path


def plain_script(
    model: Path, data: Path, method: str, steps: int, batch: int, max_length: int, out: Path
) -> tuple[dict[str, Any], float]:
    """The plain HF Trainer + PEFT script in its own process; (its JSON, wall seconds)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.plain_trainer", "--model", str(model), "--data", str(data),
         "--method", method, "--steps", str(steps), "--batch", str(batch), "--max-length", str(max_length),
         "--output", str(out)],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def ratios(ours: list[float], theirs: list[float]) -> tuple[float, list[float]]:
    """Ratio of the medians, and the range of single-run ratios (worst pairing to best)."""
    median = statistics.median(ours) / statistics.median(theirs)
    return round(median, 3), [round(min(ours) / max(theirs), 3), round(max(ours) / min(theirs), 3)]


def throughput(
    model: Path, methods: list[str], steps: int, batch: int, max_length: int, repeats: int, work: Path
) -> list[dict[str, Any]]:
    """Per method: the pipeline's training throughput and peak memory over the plain script's, same work.

    Plain and pipeline alternate `repeats` times and the medians are compared: on shared cores single runs
    of ~10 s vary by about ±10%.
    """
    rows = []
    for method in methods:
        plain, ours = [], []
        config = write_config(work / f"{method}.json", str(model), method, steps, batch, max_length)
        for attempt in range(repeats):
            log(f"throughput: {method} {attempt + 1}/{repeats} (plain script, then the pipeline)")
            plain.append(plain_script(model, SAMPLES, method, steps, batch, max_length, work / f"plain-{method}")[0])
            ours.append(adaptflow(["run", str(config), "--force"], work / method)[0]["metrics"])
            log(
                f"  plain {plain[-1]['train_tokens_per_second']:.1f} tok/s, pipeline {ours[-1]['train_tokens_per_second']:.1f}"
            )
        ours_tps = [m["train_tokens_per_second"] for m in ours]
        plain_tps = [r["train_tokens_per_second"] for r in plain]
        ours_mb = statistics.median(m["peak_memory_mb"] for m in ours)
        plain_mb = statistics.median(r["peak_memory_mb"] for r in plain)
        ratio, spread = ratios(ours_tps, plain_tps)
        rows.append(
            {
                "method": method,
                "repeats": repeats,
                "pipeline_tokens_per_second": round(statistics.median(ours_tps), 1),
                "plain_tokens_per_second": round(statistics.median(plain_tps), 1),
                "throughput_ratio": ratio,
                "throughput_ratio_range": spread,
                # Best of N per side, as timeit does: interference from other work only ever slows a run down.
                "throughput_ratio_best": round(max(ours_tps) / max(plain_tps), 3),
                "pipeline_runs_tokens_per_second": [round(t, 1) for t in ours_tps],
                "plain_runs_tokens_per_second": [round(t, 1) for t in plain_tps],
                "pipeline_peak_memory_mb": round(ours_mb, 1),
                "plain_peak_memory_mb": round(plain_mb, 1),
                "memory_ratio": round(ours_mb / plain_mb, 3),
                "total_params": ours[0]["total_params"],
            }
        )
    return rows


def control(model: Path, method: str, steps: int, batch: int, max_length: int, repeats: int, work: Path) -> dict:
    """The A/A control: the plain script against itself, alternating exactly like the throughput rows. Its
    spread is this machine's noise; a pipeline ratio inside it is no evidence of a difference either way."""
    first, second = [], []
    for attempt in range(repeats):
        log(f"control: {method} {attempt + 1}/{repeats} (the plain script twice)")
        for runs in (first, second):
            result = plain_script(model, SAMPLES, method, steps, batch, max_length, work / f"control-{method}")[0]
            runs.append(result["train_tokens_per_second"])
            log(f"  plain {runs[-1]:.1f} tok/s")
    ratio, spread = ratios(second, first)
    return {
        "method": method,
        "repeats": repeats,
        "ratio": ratio,
        "ratio_range": spread,
        "first_runs_tokens_per_second": [round(t, 1) for t in first],
        "second_runs_tokens_per_second": [round(t, 1) for t in second],
    }


# The team's models and data, beside the checkout (ADAPTFLOW_BENCH_SHARED elsewhere, e.g. from a git worktree).
SHARED = Path(os.environ.get("ADAPTFLOW_BENCH_SHARED") or ROOT.parent / "shared")


def flatten_alpaca_seed(path: Path) -> Path:
    """../shared's Alpaca seed tasks as alpaca rows: one {instruction, input, output} per instance."""
    rows = [json.loads(line) for line in (SHARED / "data" / "alpaca_seed" / "seed_tasks.jsonl").open()]
    flat = [
        {"instruction": r["instruction"], "input": i["input"], "output": i["output"]}
        for r in rows
        for i in r["instances"]
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in flat))
    return path
